#!/usr/bin/env bash
# The whole test suite, installing what it needs on first use:
#  - the Rust workspace's tests (`cargo test --workspace`);
#  - the end-to-end tests (tests/e2e: a real `serve` driven by the openai and anthropic
#    SDKs and by the real Claude Code and Codex CLIs), whose Python and npm packages go
#    into the project's own environment under target/test-env, never into the user's;
#  - the GPU tests on the CUDA emulator (tests/cuda-emulator/test.sh), which need NVRTC
#    (the nvidia-cuda-nvrtc-cu12 wheel, into the same environment) and g++.
# A second run installs nothing: the environment remembers what it was made from.
# `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")"
root="$PWD"

missing() {
    echo "test.sh: $1" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 || missing "cargo is required (install Rust: https://rustup.rs)"
command -v python3 >/dev/null 2>&1 || missing "python3 is required"

# Python packages: a virtual environment of the project's own, made again only when the
# requirements change. Where Python has no venv module, a plain package folder on
# PYTHONPATH serves instead.
env_dir="$root/target/test-env"
want="$( (cat tests/e2e/requirements.txt; echo nvidia-cuda-nvrtc-cu12) | sha256sum | cut -d' ' -f1)"
stamp="$env_dir/installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "test.sh: installing the test suite's Python packages into target/test-env" >&2
    rm -rf "$env_dir"
    mkdir -p "$root/target"
    if python3 -m venv "$env_dir" >/dev/null 2>&1 && [ -x "$env_dir/bin/python" ]; then
        "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check \
            -r tests/e2e/requirements.txt nvidia-cuda-nvrtc-cu12
    else
        rm -rf "$env_dir"
        python3 -m pip --version >/dev/null 2>&1 ||
            missing "python3 has neither the venv module nor pip (install python3-venv or python3-pip)"
        python3 -m pip install --quiet --disable-pip-version-check --target "$env_dir/site" \
            -r tests/e2e/requirements.txt nvidia-cuda-nvrtc-cu12
    fi
    echo "$want" >"$stamp"
fi
if [ -x "$env_dir/bin/python" ]; then
    export PATH="$env_dir/bin:$PATH"
else
    export PYTHONPATH="$env_dir/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# The real agent clients for tests/e2e/test_agents.py (Claude Code and Codex, pinned),
# from npm into target/test-env/agents.
agents_dir="$root/target/test-env/agents"
agents="@anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0"
command -v npm >/dev/null 2>&1 || missing "npm is required for the agent-client tests (install Node.js)"
if [ "$(cat "$agents_dir/installed" 2>/dev/null)" != "$agents" ]; then
    echo "test.sh: installing the agent clients ($agents) into target/test-env/agents" >&2
    rm -rf "$agents_dir"
    mkdir -p "$agents_dir"
    # shellcheck disable=SC2086
    npm install --prefix "$agents_dir" --no-audit --no-fund --loglevel=error $agents >&2
    echo "$agents" >"$agents_dir/installed"
fi
export KIMI_HYBRID_AGENTS_BIN="$agents_dir/node_modules/.bin"
export KIMI_HYBRID_REQUIRE_AGENTS=1

# NVRTC compiles the CUDA kernels without a GPU: the kernels-cuda tests compile every
# kernel for sm_90 and sm_100 and must not skip.
nvrtc_lib="$(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib"))')"
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KIMI_HYBRID_REQUIRE_NVRTC=1

# The CUDA emulator is built with g++: installed through apt-get when running as root,
# otherwise named.
if ! command -v g++ >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing g++ (apt-get)" >&2
        apt-get update -qq && apt-get install -y -qq g++ >/dev/null
    else
        missing "g++ is required for the CUDA emulator: install the g++ package (e.g. sudo apt-get install g++)"
    fi
fi

cargo test --workspace
python3 -m pytest tests/e2e -q
tests/cuda-emulator/test.sh
