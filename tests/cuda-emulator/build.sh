#!/usr/bin/env bash
# Builds the CUDA emulator (a libcuda.so that runs the project's kernels on the CPU) into
# target/cuda-emulator/. Tests run against it with that directory first on
# LD_LIBRARY_PATH; see driver.cpp. symbols.txt lists every driver function cudarc loads
# (regenerate with ./symbols.sh after a cudarc upgrade).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$root/target/cuda-emulator"
gen="$out/gen"
mkdir -p "$gen"
cu="$root/kernels-cuda/src/cu"

# One translation unit per kernel source, with its kernels registered by name.
for src in "$cu"/*.cu; do
    name="$(basename "$src" .cu)"
    {
        echo "#include \"$here/cuda_emu.h\""
        echo "#include \"$cu/prelude.cuh\""
        echo "#include \"$src\""
        grep -oE 'extern "C" __global__ void (__launch_bounds__\([^)]*\) )?[A-Za-z_0-9]+' "$src" |
            awk '{print "EMU_KERNEL(" $NF ")"}'
    } >"$gen/$name.cpp"
done

# Every other driver function answers "not supported".
while read -r sym; do
    echo "extern \"C\" int emu_unsupported(const char*);"
    echo "extern \"C\" __attribute__((weak, visibility(\"default\"))) int $sym() { return emu_unsupported(\"$sym\"); }"
done <"$here/symbols.txt" >"$gen/stubs.cpp"

g++ -std=c++20 -O2 -g -fPIC -shared -fvisibility=hidden -Wall -Wno-unused-function -Wno-sign-compare -Wno-unknown-pragmas \
    -o "$out/libcuda.so.1" "$here/driver.cpp" "$here/scheduler.cpp" "$gen"/*.cpp -lpthread
ln -sf libcuda.so.1 "$out/libcuda.so"
echo "$out"
