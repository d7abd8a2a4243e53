# Shared helpers for scripts/*.sh. Sourced, not run.

step() { printf '\n==> %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# N varied short texts, one per line, the same every run (demo, benchmarks).
sample_texts() {
  python3 - "$1" <<'PY'
import random, sys
random.seed(7)
words = 'swarm node model peer shard gossip auction vector token cache proof result small fast open'.split()
for i in range(int(sys.argv[1])):
    print(f'{i}: ' + ' '.join(random.choice(words) for _ in range(random.randint(4, 30))))
PY
}

# Rust must already be installed (rustup); everything else cargo fetches.
need_rust() {
  if ! have cargo; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  have cargo || die "cargo not found: install Rust (https://rustup.rs), then run this again"
}

# The release binary as BIN, and the models fetched into $1 (harnesses that
# run a testnet of real nodes).
release_with_models() {
  step "building mycel (release)"
  cargo build --locked --release --bin mycel
  BIN=$PWD/target/release/mycel
  "$BIN" models fetch --dir "$1"
}

# A build of the whole workspace (debug, with the test binaries) takes about
# 3 GiB under target/ (4 asked, for headroom). Say so up front rather than let rustc die half way
# with "No space left on device".
need_disk() {
  local want_gib="$1" dir="${CARGO_TARGET_DIR:-$PWD/target}" free_kib
  mkdir -p "$dir"
  free_kib=$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')
  [ -n "$free_kib" ] || return 0
  if [ "$free_kib" -lt $((want_gib * 1024 * 1024)) ]; then
    local target_kib
    target_kib=$(du -sk "$dir" 2>/dev/null | awk '{ print $1 }')
    # What is already built under target/ will be reused, not rebuilt.
    [ "$((free_kib + ${target_kib:-0}))" -ge $((want_gib * 1024 * 1024)) ] && return 0
    die "only $((free_kib / 1024)) MiB free for $dir; the build needs about ${want_gib} GiB (free some space, or set CARGO_TARGET_DIR)"
  fi
}

# The openai Python client and Prometheus' parser, for the interface tests,
# in a virtual environment under target/ (made once).
need_test_python() {
  local venv="$PWD/target/pyenv"
  if ! "$venv/bin/python" -c 'import openai, prometheus_client, langchain_openai, ollama' 2>/dev/null; then
    have python3 || die "python3 not found: the interface tests drive the node with the openai Python client"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/test-requirements.txt
  fi
  export MYCEL_TEST_PYTHON="$venv/bin/python"
}

# Headless Chromium for the dashboard test (Debian's package).
# iptables, for the network-fault tests (packet loss inside the testnet's own
# namespaces). Only as root, where those tests run; elsewhere they skip.
need_iptables() {
  if ! have iptables && [ "$(id -u)" = 0 ] && have apt-get; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables >/dev/null \
      || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables >/dev/null; } \
      || echo "(could not install iptables: the packet-loss test will skip)"
  fi
}

need_chromium() {
  if ! have chromium; then
    if have apt-get && [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
        || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null; } \
        || die "could not install chromium"
    elif have apt-get && have sudo; then
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null || die "could not install chromium"
    else
      die "chromium not found: install it (Debian: apt-get install chromium) for the dashboard test"
    fi
  fi
  export MYCEL_TEST_CHROMIUM="$(command -v chromium)"
}
