# Shared helpers for scripts/*.sh. Sourced, not run.

step() { printf '\n==> %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Rust must already be installed (rustup); everything else cargo fetches.
need_rust() {
  if ! have cargo; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  have cargo || die "cargo not found: install Rust (https://rustup.rs), then run this again"
}
