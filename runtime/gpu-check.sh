#!/usr/bin/env bash
# Runs the GPU checks of the CUDA back end in one go, on a machine with an
# NVIDIA GPU and driver, within about ten minutes (each step has a timeout).
#
# What it does:
#   1. installs NVRTC from the Python package index (nvidia-cuda-nvrtc-cu12)
#      unless libnvrtc.so.12 is already on LD_LIBRARY_PATH, and exports the
#      path of its lib folder;
#   2. builds the runtime's NVRTC and interpreter tests in release mode;
#   3. runs every lowered kernel under the CPU interpreter against the CPU
#      reference (cuda_interp);
#   4. compiles every kernel with NVRTC for sm_80 and sm_90, then runs every
#      kernel on GPU 0 against the CPU reference (nvrtc), with
#      LDNC_REQUIRE_NVRTC=1 and LDNC_REQUIRE_GPU=1 so that a missing library
#      or GPU fails instead of skipping;
#   5. prints a short benchmark of the conv2d kernel at three DenseNet-like
#      shapes (milliseconds per step including host copies);
#   6. trains the quick start for one epoch on the GPU;
#   7. prints images/s of a training step for the CIFAR examples at batch 64
#      on the GPU (`ldnc bench --device cuda`), with the planned buffer bytes.
#
# Usage: runtime/gpu-check.sh   (from any folder; exits non-zero on failure)
set -euo pipefail

cd "$(dirname "$0")/.."

if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so.12' \
    && ! compgen -G "${LD_LIBRARY_PATH:-/nonexistent}/libnvrtc.so.12" >/dev/null; then
    python3 -m pip install --quiet nvidia-cuda-nvrtc-cu12
fi
nvrtc_lib="$(python3 -c 'import nvidia.cuda_nvrtc as m, os; print(os.path.join(m.__path__[0], "lib"))' 2>/dev/null || true)"
if [ -n "$nvrtc_lib" ]; then
    export LD_LIBRARY_PATH="$nvrtc_lib:${LD_LIBRARY_PATH:-}"
fi

echo "== build (release)"
timeout 300 cargo test --release -p ldnc-runtime --test nvrtc --test cuda_interp --no-run

echo "== kernels under the interpreter vs the CPU reference"
timeout 120 cargo test --release -p ldnc-runtime --test cuda_interp

echo "== NVRTC compile for sm_80 and sm_90, then GPU kernels vs the CPU reference"
LDNC_REQUIRE_NVRTC=1 LDNC_REQUIRE_GPU=1 \
    timeout 120 cargo test --release -p ldnc-runtime --test nvrtc -- --nocapture

echo "== benchmark"
timeout 60 cargo test --release -p ldnc-runtime --test nvrtc -- --ignored --nocapture gpu_conv2d_benchmark

echo "== quick start, one epoch on the GPU"
timeout 120 cargo build --release -p ldnc-runtime --bin ldnc
run_dir="$(mktemp -d)"
timeout 150 target/release/ldnc train examples/quickstart.ron --data fashion-mnist \
    --device cuda --epochs 1 --out "$run_dir"

echo "== training-step benchmark on the GPU, batch 64"
for net in examples/*-cifar.ron examples/densenet-bc-100.ron; do
    timeout 30 target/release/ldnc bench "$net" --device cuda --batch 64 --steps 3 \
        || echo "benchmark of $net failed or timed out"
done
# TODO: run PyTorch's DenseNet on the same GPU, network and batch when torch is
# installed, for the side-by-side figures.

echo "== GPU checks passed"
