"""End-to-end with the real agent clients: Claude Code (`claude -p`) over the Anthropic
Messages API and Codex (`codex exec`) over the Responses API, against `serve` on the
demo model. test.sh installs the pinned npm packages and sets KIMI_HYBRID_AGENTS_BIN;
without it (pytest run by hand) these tests are skipped unless
KIMI_HYBRID_REQUIRE_AGENTS=1.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Server

AGENTS_BIN = os.environ.get("KIMI_HYBRID_AGENTS_BIN")
if not AGENTS_BIN:
    if os.environ.get("KIMI_HYBRID_REQUIRE_AGENTS") == "1":
        raise RuntimeError("KIMI_HYBRID_AGENTS_BIN is not set (test.sh installs the agent clients)")
    pytest.skip("agent clients not installed (run ./test.sh)", allow_module_level=True)

MODEL = "kimi-agents"
# Claude Code's first request is about 39K demo tokens of system prompt and tools. Random
# weights end their turn after ~1-2K tokens on average, at random: the answer needs room
# far beyond that, because a reply cut off by the context window is an error for Claude
# Code (46,000 left ~7K of room, and a long random answer failed a CI run), yet bounded.
MAX_MODEL_LEN = "64000"


@pytest.fixture(scope="module")
def agent_server():
    s = Server("--max-model-len", MAX_MODEL_LEN, "--served-model-name", MODEL)
    yield s
    s.stop()


def claude(server, tmp_path: Path, prompt: str, *args: str, headers: str | None = None):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": server.base,
        "ANTHROPIC_API_KEY": "unused",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    if headers:
        env["ANTHROPIC_CUSTOM_HEADERS"] = headers
    return subprocess.run(
        [os.path.join(AGENTS_BIN, "claude"), "-p", prompt, "--model", MODEL, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )


def test_claude_code_default_run_exits_0(agent_server, tmp_path):
    # The default run: full system prompt, 25 tools, adaptive thinking, a system turn
    # inside messages, streamed; random weights answer whatever they answer.
    r = claude(agent_server, tmp_path, "Reply exactly: ok", "--max-turns", "1",
               "--output-format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["subtype"] == "success" and not result["is_error"], result
    assert "route=\"/v1/messages\"" in agent_server.read_log()


def test_claude_code_runs_a_tool_and_goes_on(agent_server, tmp_path):
    (tmp_path / "note.txt").write_text("kimi-tool-ran\n")
    note = str(tmp_path / "note.txt")
    call = ("Reading.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.Read:0"
            "<|tool_call_argument_begin|>" + json.dumps({"file_path": note})
            + "<|tool_call_end|><|tool_calls_section_end|>")
    outputs = [call, "Done.</think>The note says kimi-tool-ran."]
    r = claude(agent_server, tmp_path, "Read note.txt", "--max-turns", "3",
               "--output-format", "stream-json", "--verbose",
               headers="x-forced-outputs: " + json.dumps(outputs))
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    tool_results = [
        block for e in events if e.get("type") == "user"
        for block in e["message"]["content"] if block.get("type") == "tool_result"
    ]
    # Claude Code ran Read on the model's call and sent the file back.
    assert len(tool_results) == 1 and "kimi-tool-ran" in json.dumps(tool_results[0])
    final = events[-1]
    assert final["type"] == "result" and final["subtype"] == "success", final
    assert final["result"] == "The note says kimi-tool-ran."


def test_codex_exec_exits_0_over_responses(agent_server, tmp_path):
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{MODEL}"\n'
        'model_provider = "kimi"\n\n'
        "[model_providers.kimi]\n"
        'name = "kimi-hybrid"\n'
        f'base_url = "{agent_server.base}/v1"\n'
        'wire_api = "responses"\n'
        'env_key = "KIMI_API_KEY"\n'
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "CODEX_HOME": str(home),
        "KIMI_API_KEY": "unused",
    }
    r = subprocess.run(
        [os.path.join(AGENTS_BIN, "codex"), "exec", "--skip-git-repo-check", "Reply exactly: ok"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "route=\"/v1/responses\"" in agent_server.read_log()
