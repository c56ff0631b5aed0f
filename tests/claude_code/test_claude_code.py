"""Claude Code, the agent of the request trace, runs its tool loop on tokenfactory.

The real CLI (pinned, installed by `make test` outside the repository; its path comes in
TOKENFACTORY_CLAUDE_BIN) is pointed at a live server on a loopback port. These tests fail,
never skip, when the CLI is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.live import free_port, live_server
from tokenfactory.engine.async_engine import AsyncEngine
from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ScriptedExecutor
from tokenfactory.text.tool_parsers import render_tool_call_text

FILE_CONTENT = "dark mode: on\n"
FINAL_TEXT = "Done: I created notes.txt with the dark mode setting."


def claude_bin() -> str:
    path = os.environ.get("TOKENFACTORY_CLAUDE_BIN") or shutil.which("claude")
    if not path or not Path(path).exists():
        pytest.fail("Claude Code CLI not found: run `make test` (it installs the pinned CLI) or "
                    "set TOKENFACTORY_CLAUDE_BIN")
    return path


class RecordingEngine(AsyncEngine):
    """Keeps every finished request's output so the test can read real usage per turn."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.finished = []

    async def generate(self, *args, **kwargs):
        t0 = time.monotonic()
        first = None
        async for out in super().generate(*args, **kwargs):
            if first is None:
                first = time.monotonic() - t0
            if out.finished:
                self.finished.append((out, first))
            yield out


def run_claude(url: str, workdir: Path, prompt: str, timeout: float) -> subprocess.CompletedProcess:
    home = workdir.parent / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "sk-local-test",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    return subprocess.run([claude_bin(), "-p", "--permission-mode", "acceptEdits", prompt],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def scratch_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "README.md").write_text("# blog\n")
    return repo


def test_claude_code_tool_loop_with_scripted_model(demo_tokenizer, scratch_repo):
    tok = demo_tokenizer
    eos = min(tok.eos_token_ids)
    target = scratch_repo / "notes.txt"
    write_call = render_tool_call_text("Write", {"file_path": str(target), "content": FILE_CONTENT},
                                       "hermes")

    def script(req):
        text = tok.decode(req.prompt_token_ids, skip_special_tokens=False)
        # After the tool ran, the conversation holds its result: answer in plain text.
        reply = FINAL_TEXT if "<tool_response>" in text else write_call
        return tok.encode(reply) + [eos]

    core = EngineCore(ScriptedExecutor(script, eos),
                      EngineConfig(num_kv_blocks=8192, block_size=16, max_num_batched_tokens=4096),
                      model_max_len=65536, tokenizer=tok, eos_token_ids=tok.eos_token_ids)
    engine = RecordingEngine(core)
    with live_server(tok, engine=engine, served_model_name="tf-local",
                     aliases=[("claude-*", "tf-local")], ping_interval=10.0) as srv:
        proc = run_claude(srv.base_url, scratch_repo, "Write the dark mode setting to notes.txt.", 300)
        assert proc.returncode == 0, f"claude exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert target.read_text() == FILE_CONTENT
        assert FINAL_TEXT in proc.stdout
        turns = [out for out, _ in engine.finished]
        assert len(turns) >= 2, [len(o.prompt_token_ids) for o in turns]
        second = turns[-1]
        prompt_len = len(second.prompt_token_ids)
        assert second.num_cached_tokens >= 0.9 * prompt_len, (second.num_cached_tokens, prompt_len)
        assert core.num_free_blocks() == core.kv.num_blocks
        report = [{"prompt_tokens": len(o.prompt_token_ids), "cached_tokens": o.num_cached_tokens,
                   "output_tokens": len(o.outputs[0].token_ids), "ttft_s": round(t, 3)}
                  for o, t in engine.finished]
        print("claude-code turns:", json.dumps(report))


def test_claude_code_on_the_random_demo_model(scratch_repo, tmp_path):
    """No script: the built-in demo model (random weights) behind a real `tokenfactory serve`
    process. Claude Code must exit 0 and print what the model produced; nothing is rejected."""
    import sys
    import urllib.request

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tokenfactory.cli", "serve", "--demo", "--port", str(port),
             "--model-alias", "claude-*=tokenfactory-demo"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # first use builds the demo checkpoint
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        proc = run_claude(url, scratch_repo, "Add dark mode functionality to my blog.", 600)
        log_text = log_path.read_text()
        assert proc.returncode == 0, f"claude exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.strip(), "Claude Code printed nothing"
        requests = [line for line in log_text.splitlines() if '"POST /v1/messages' in line]
        assert requests, log_text[-3000:]
        assert all(" 200 " in line for line in requests), "\n".join(requests)
        print("demo-model turns:", len(requests), "| output:", proc.stdout[:200].replace("\n", " "))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
