#!/usr/bin/env bash
# Lists the driver functions the locked cudarc version loads (all of them must exist in
# a libcuda.so for cudarc to open it) into symbols.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="$(grep -A1 'name = "cudarc"' "$here/../../Cargo.lock" | sed -n 's/version = "\(.*\)"/\1/p')"
src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$version" | head -1)"
grep -o 'get(b"cu[A-Za-z0-9_]*' "$src/src/driver/sys/mod.rs" | sed 's/get(b"//' | sort -u >"$here/symbols.txt"
wc -l <"$here/symbols.txt"
