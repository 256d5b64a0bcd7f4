#!/usr/bin/env bash
# Runs the tests that need a GPU on the CUDA emulator (two emulated GPUs): the kernels
# against their CPU twins on the real K2 shapes, every golden fixture on the CUDA
# backend (the resident pass), hybrid execution (one GPU, and pipelined over
# two), the paged resident pass, and the expert-, data- and tensor-parallel passes over
# two GPUs. They must not skip here (KIMI_HYBRID_REQUIRE_GPU).
# NVRTC (the nvidia-cuda-nvrtc-cu12 wheel, or a CUDA toolkit on LD_LIBRARY_PATH) compiles
# the kernels exactly as on a GPU machine; the emulator then runs them on the CPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
emulator="$("$root/tests/cuda-emulator/build.sh")"
if nvrtc="$(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib"))' 2>/dev/null)"; then
    export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export LD_LIBRARY_PATH="$emulator${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Two 16 GiB GPUs, and a third of 2 MiB for running out of device memory mid-request.
export KIMI_HYBRID_EMULATED_GPUS=3 KIMI_HYBRID_EMULATED_GPU_GIB=16,16,0.002
export KIMI_HYBRID_REQUIRE_GPU=1 KIMI_HYBRID_REQUIRE_NVRTC=1
cd "$root"
cargo test --workspace --lib --test gpu_kernels --test golden --test hybrid --test expert_parallel --test forward
# The kernels again with the threads of every block in a shuffled order: a kernel that
# reads another thread's writes without a barrier between them gives other numbers.
KIMI_HYBRID_EMULATOR_SCHEDULE=shuffle cargo test --workspace --test gpu_kernels
