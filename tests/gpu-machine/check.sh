#!/usr/bin/env bash
# On a GPU machine: the GPU tests (none may skip), `bench gpu` and the engine benchmarks
# with and without CUDA graphs, compute-sanitizer's race and memory checks of the
# kernels, and the SDK end-to-end tests against `serve --backend cuda`. Uses the binaries
# of gpu-bundle.tar.xz (tests/gpu-machine/pack.sh) when present, else builds them.
# Logs go to $LOGS (default ./gpu-check-logs). The CUDA toolkit's libraries (NVRTC,
# cuBLAS) and NCCL are looked for under /usr/local/cuda* and Python's site-packages.
set -u
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
logs="${LOGS:-$root/gpu-check-logs}"
mkdir -p "$logs"
bin="$root/target/release"
if [ -f gpu-bundle.tar.xz ]; then
    mkdir -p "$bin/deps"
    tar -C "$bin/deps" -xJf gpu-bundle.tar.xz
    mv "$bin/deps/kimi-hybrid" "$bin/"
else
    bash tests/gpu-machine/pack.sh >/dev/null
    tar -C "$bin/deps" -xJf gpu-bundle.tar.xz && mv "$bin/deps/kimi-hybrid" "$bin/"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# Each library's newest real file (never the toolkit's link stubs), linked under its
# unversioned name where only versioned files exist (pip wheels).
libs="$(mktemp -d)"
search="/usr/local/cuda*/ $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)"
for name in libnvrtc libcublas libcublasLt libnccl; do
    f="$(find $search -name "$name.so*" -type f -not -path '*stubs*' 2>/dev/null | sort -V | tail -1)"
    [ -n "$f" ] && ln -sf "$f" "$libs/$name.so" && echo "$name: $f"
    [ -n "$f" ] && LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH="$libs:$LD_LIBRARY_PATH"
export KIMI_HYBRID_REQUIRE_GPU=1 KIMI_HYBRID_REQUIRE_NVRTC=1
status=0
for t in kernels_cuda gpu_kernels golden hybrid forward expert_parallel kimi_hybrid cli; do
    exe="$(ls "$bin"/deps/"$t"-* 2>/dev/null | head -1)"
    "$exe" >"$logs/$t.log" 2>&1 || status=1
    echo "$t: $(grep -E '^test result' "$logs/$t.log" | tail -1)"
done
{
    "$bin/kimi-hybrid" bench gpu
    for eager in "" --enforce-eager; do
        "$bin/kimi-hybrid" bench -p 512 -n 128 --backend cuda -c 1,8,32 $eager
        "$bin/kimi-hybrid" bench -p 512 -n 128 --profile 1xH100+512GB $eager
    done
} 2>&1 | tee "$logs/bench.log"
if command -v compute-sanitizer >/dev/null; then
    kernels="$(ls "$bin"/deps/gpu_kernels-* | head -1)"
    compute-sanitizer --tool racecheck "$kernels" mla_decode >"$logs/racecheck.log" 2>&1 || status=1
    compute-sanitizer --tool memcheck "$kernels" mla_decode int4 grouped >"$logs/memcheck.log" 2>&1 || status=1
    grep -h "SUMMARY" "$logs/racecheck.log" "$logs/memcheck.log"
fi
if python3 -c 'import openai, anthropic, pytest' 2>/dev/null; then
    wrapper="$(mktemp)"
    printf '#!/bin/sh\nexec "%s" "$@" --backend cuda --shutdown-timeout 300\n' "$bin/kimi-hybrid" >"$wrapper"
    chmod +x "$wrapper"
    KIMI_HYBRID_BIN="$wrapper" python3 -m pytest tests/e2e -q >"$logs/e2e.log" 2>&1 || status=1
    tail -1 "$logs/e2e.log"
fi
exit $status
