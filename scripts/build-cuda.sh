#!/usr/bin/env bash
# Builds the CUDA `mycel` binary on a machine without a GPU or a CUDA install:
# CUDA 13.0's compiler, headers and libraries come from PyPI wheels (one
# nvidia/cu13 prefix), kernels are compiled for one compute capability, and
# the binary links against a stub libcuda.so (the real one comes with the
# driver on the GPU machine).
#   bash scripts/build-cuda.sh            # -> target/cuda/release/mycel
#   CUDA_COMPUTE_CAP=90 bash scripts/build-cuda.sh   (90 = H100/H200)
#   bash scripts/build-cuda.sh --test     # also the GPU test binary
#                                         # (crates/models/tests/cuda.rs)
#
# The default build stays CPU-only: candle links the CUDA libraries at build
# time, so this binary only starts where they are (the driver's libcuda, and
# the toolkit libraries below, on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
need_rust
with_test=false
case "${1:-}" in
  --test) with_test=true ;;
  "") ;;
  *) die "unknown option $1 (usage: bash scripts/build-cuda.sh [--test])" ;;
esac

toolkit="$PWD/target/cuda-toolkit"
prefix="$toolkit/nvidia/cu13"
if [ ! -x "$prefix/bin/nvcc" ]; then
  step "installing the CUDA 13.0 toolkit wheels into $toolkit"
  python3 -m pip install -q --no-deps --target "$toolkit" \
    'nvidia-cuda-nvcc~=13.0.0' 'nvidia-cuda-crt~=13.0.0' 'nvidia-nvvm~=13.0.0' \
    'nvidia-cuda-runtime~=13.0.0' 'nvidia-cuda-cccl~=13.0.0' 'nvidia-cuda-nvrtc~=13.0.0' \
    'nvidia-cublas~=13.0.0' 'nvidia-curand~=10.4.0.0'
fi
[ -x "$prefix/bin/nvcc" ] || die "nvcc not found under $prefix after installing the wheels"

# Unversioned library names for the linker (the wheels ship only .so.N).
for lib in "$prefix"/lib/*.so.*; do
  base="${lib%%.so.*}.so"
  [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done
# nvcc looks for its tools and headers relative to the toolkit root.
[ -e "$prefix/lib64" ] || ln -s lib "$prefix/lib64"
[ -e "$prefix/nvvm/bin/cicc" ] || die "cicc missing: is nvidia-nvvm installed under $prefix?"

export PATH="$prefix/bin:$PATH"
export CUDA_ROOT="$prefix" CUDA_PATH="$prefix" CUDA_TOOLKIT_ROOT_DIR="$prefix"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$prefix/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"

# The stub driver library: every cu* symbol the binary references, doing
# nothing. Built once from the names the link asks for.
stubs="$toolkit/stubs"
mkdir -p "$stubs"
if [ ! -e "$stubs/libcuda.so" ]; then
  echo 'void cuInit(void) {}' > "$stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/cuda_stub.c"
fi
export LIBRARY_PATH="$stubs:$LIBRARY_PATH"

step "building mycel with CUDA (compute capability $CUDA_COMPUTE_CAP)"
build() {
  # target-cpu=native does not describe the GPU machine's CPU: use a
  # portable x86-64-v3 baseline (AVX2) instead.
  RUSTFLAGS="-C target-cpu=x86-64-v3" cargo build --locked --release -p mycel-node --features cuda \
    --target-dir target/cuda 2>&1 | tee "$toolkit/build.log" | grep -E '^(error|warning: unused)|Finished' || true
}
build
# GNU ld says "undefined reference to `cuX'", lld "undefined symbol: cuX"
# (lld stops after 20 errors, so this can take a few rounds; only the link
# step reruns).
missing() { grep -oE "undefined (reference to .|symbol: )cu[A-Za-z0-9_]+" "$toolkit/build.log" | grep -oE "cu[A-Za-z0-9_]+$" | sort -u; }
touch "$stubs/symbols.txt"
for _ in $(seq 1 30); do
  [ -n "$(missing)" ] || break
  before=$(wc -l < "$stubs/symbols.txt")
  { cat "$stubs/symbols.txt"; missing; } | sort -u > "$stubs/symbols.new" && mv "$stubs/symbols.new" "$stubs/symbols.txt"
  [ "$(wc -l < "$stubs/symbols.txt")" -gt "$before" ] || die "the link still fails; see $toolkit/build.log"
  step "stub libcuda.so with $(wc -l < "$stubs/symbols.txt") driver symbols; linking again"
  awk '{ print "void " $1 "(void) {}" }' "$stubs/symbols.txt" > "$stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/cuda_stub.c"
  build
done
[ -x target/cuda/release/mycel ] || die "the CUDA build failed; see $toolkit/build.log"
echo "built target/cuda/release/mycel; run it with LD_LIBRARY_PATH=$prefix/lib on a machine with the NVIDIA driver"
if $with_test; then
  step "building the GPU test (crates/models/tests/cuda.rs)"
  test_bin=$(RUSTFLAGS="-C target-cpu=x86-64-v3" cargo test --locked --release -p mycel-models --features cuda \
    --test cuda --no-run --target-dir target/cuda 2>&1 | tee "$toolkit/test-build.log" \
    | grep -oE 'target/cuda/release/deps/cuda-[0-9a-f]+' | tail -1) || true
  [ -n "$test_bin" ] && [ -x "$test_bin" ] || die "the GPU test did not build; see $toolkit/test-build.log"
  echo "built $test_bin; run it on the GPU machine with LD_LIBRARY_PATH=$prefix/lib MYCEL_TEST_MODELS=<models dir>"
fi
