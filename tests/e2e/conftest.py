"""Starts real `kimi-hybrid serve` processes on 127.0.0.1 for the end-to-end tests.

The binary is the one `cargo test` builds (target/debug/kimi-hybrid), or
$KIMI_HYBRID_BIN. The served checkpoint is the golden fixture tests/fixtures/kimi-int4
(the same model as the bundled demo).
"""

import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "kimi-int4"
API_KEY = "test-key-123"
MODEL = "kimi-test"


def binary() -> str:
    env = os.environ.get("KIMI_HYBRID_BIN")
    if env:
        return env
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "kimi-hybrid"
        if path.exists():
            return str(path)
    raise RuntimeError("build kimi-hybrid first (cargo test builds target/debug/kimi-hybrid)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [
            binary(), "serve", "--model", str(FIXTURE), "--port", str(self.port),
            "--served-model-name", MODEL, "--allow-forced-output", *extra,
        ]
        self.log = open(ROOT / "target" / f"e2e-serve-{self.port}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early: {self.read_log()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy: " + self.read_log())

    def read_log(self) -> str:
        self.log.flush()
        return (ROOT / "target" / f"e2e-serve-{self.port}.log").read_text()

    def metrics(self) -> dict:
        text = httpx.get(self.base + "/metrics", timeout=5).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server():
    s = Server("--api-key", API_KEY, "--max-model-len", "512", "--max-body-mib", "1")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def golden():
    """prompt_ids and greedy_ids of the served fixture, read from its safetensors file."""
    data = (FIXTURE / "golden.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name in ("prompt_ids", "greedy_ids"):
        t = header[name]
        assert t["dtype"] == "I64"
        a, b = t["data_offsets"]
        out[name] = list(struct.unpack(f"<{(b - a) // 8}q", body[a:b]))
    return out
