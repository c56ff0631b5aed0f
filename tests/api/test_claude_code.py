"""Smoke: the real Claude Code CLI runs a Write-then-answer tool loop against the server.

Issue 7 owns the full end-to-end test (pinned CLI installed by the Makefile, fails if absent);
this one runs when that CLI is already in the cache and checks the API side: the requests are
accepted, the tool call is applied, turn 2 reads >= 90% of its prompt from the cache.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import live_server, make_engine

CLAUDE = Path.home() / ".cache/tokenfactory/claude-code-2.1.329/node_modules/@anthropic-ai" \
    / "claude-code-linux-x64/claude"


@pytest.mark.skipif(not CLAUDE.is_file(), reason=f"Claude Code CLI not installed at {CLAUDE}")
def test_claude_code_tool_loop(tokenizer, tmp_path):
    work, home = tmp_path / "repo", tmp_path / "home"
    work.mkdir(), home.mkdir()
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    eos = min(tokenizer.eos_token_ids)
    prompts: list[int] = []

    def script(req):
        prompts.append(len(req.prompt_token_ids))
        text = tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)
        if "<tool_response>" in text:
            return tokenizer.encode("I created hello.txt with the greeting.") + [eos]
        args = {"file_path": str(work / "hello.txt"), "content": "hello from tokenfactory\n"}
        import json
        call = '<tool_call>\n{"name": "Write", "arguments": ' + json.dumps(args) + "}\n</tool_call>"
        return tokenizer.encode(call) + [eos]

    engine = make_engine(tokenizer, num_blocks=4096, model_len=65536, script=script,
                         max_num_batched_tokens=8192)
    with live_server(tokenizer, engine=engine, aliases=[("claude-*", "tf-test")],
                     api_keys={"k": "cc"}) as srv:
        env = {**os.environ, "ANTHROPIC_BASE_URL": srv.base_url, "ANTHROPIC_API_KEY": "k",
               "HOME": str(home), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1"}
        p = subprocess.run([str(CLAUDE), "-p", "--permission-mode", "acceptEdits",
                            "Create hello.txt with a greeting"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "I created hello.txt" in p.stdout
        assert (work / "hello.txt").read_text() == "hello from tokenfactory\n"
        m = srv.app.state.ctx.metrics
        assert len(prompts) == 2 and prompts[0] > 10_000
        cached = m.cached_tokens._value.get()
        assert cached >= 0.9 * prompts[1]
        srv.assert_no_leaks()
