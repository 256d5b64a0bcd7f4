#!/usr/bin/env bash
# Builds the release binary and the GPU test binaries and packs them (stripped) into
# gpu-bundle.tar.xz at the repository root, for a GPU machine without a Rust toolchain:
# copy the repository there with the bundle and run tests/gpu-machine/check.sh. The test
# binaries find their fixtures through the path they were built at, so the repository
# must sit at that same path there (a symbolic link will do).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
cargo build --release
stage="$(mktemp -d)"
cargo test --release --workspace --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
keep = {"gpu_kernels", "golden", "hybrid", "expert_parallel", "forward", "kimi_hybrid", "kernels_cuda", "cli"}
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and m["target"]["name"] in keep:
        print(m["executable"])
' | while read -r exe; do cp "$exe" "$stage/"; done
cp target/release/kimi-hybrid "$stage/"
strip "$stage"/*
tar -C "$stage" -cJf gpu-bundle.tar.xz .
rm -rf "$stage"
ls -la gpu-bundle.tar.xz
