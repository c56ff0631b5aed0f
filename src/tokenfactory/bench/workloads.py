"""Benchmark workloads, generated locally and deterministically from a seed.

A workload is a list of sessions. A session arrives at `arrival` seconds after the start and
sends its turns one after another (closed loop): turn k is sent `think_time` seconds after the
answer to turn k-1 arrived. Before turn k > 0 the client appends the assistant's reply to turn
k-1 (the model's own text when `reply == "model"`, or the turn's scripted `assistant` text, so
every target sees the same prompts) and then the turn's `user` content. Single-turn sessions with
Poisson arrivals make an open-loop workload.

Prompt sizes are in tokens of the target's tokenizer, approximated from words with
`tokens_per_word` (the CLI calibrates it on the model's tokenizer when one is available); the
edit workload's source files are sized with `tokens_per_char` likewise.
"""
from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

WORKLOADS = ("agentic", "chat", "long-context", "reasoning", "edit")


@dataclass
class Turn:
    user: str                       # the new user content of this turn (a tool result after turn 0)
    max_tokens: int                 # fixed output length: sent with ignore_eos / min_tokens
    think_time: float = 0.0         # seconds between the previous answer and this request
    assistant: str | None = None    # scripted reply to the previous turn (reply == "scripted")


@dataclass
class Session:
    id: str
    arrival: float                  # seconds after the run starts
    system: str
    turns: list[Turn]
    tools: list[dict] = field(default_factory=list)   # neutral schemas: {name, description, parameters}
    reply: str = "scripted"         # "scripted" | "model"


@dataclass
class Workload:
    name: str
    seed: int
    params: dict[str, Any]
    sessions: list[Session]
    max_concurrency: int = 0        # sessions in flight at once; 0 = unbounded

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def head(self, n_sessions: int) -> Workload:
        """The same workload restricted to its first `n_sessions` sessions."""
        return Workload(self.name, self.seed, dict(self.params), self.sessions[:n_sessions],
                        min(self.max_concurrency or n_sessions, n_sessions))

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- text

_WORDS = """the a of to and in is for on that with as it be by this are from at or an was we can
will not have which you all use each if when then so but one more new file code test server request
model token cache block page batch queue step value list string number error result return call
function class method module package import build run time memory thread process client engine
prefix context window output input prompt answer question user system tool data table index key
first last next previous every some many few large small long short fast slow high low open close
read write send receive load store compute measure check update create delete find search sort
merge split parse format print log report config option path name type field record line word""".split()
_IDENT = """get_user load_config parse_args run_tests build_index fetch_page write_file read_file
compute_hash schedule_batch evict_block update_cache send_request handle_error format_report""".split()
_TOOL_NAMES = ["read_file", "write_file", "edit_file", "run_command", "search_code", "list_directory",
               "web_fetch", "run_tests", "git_diff", "ask_user"]


class TextGen:
    """Deterministic filler text of a requested size in tokens (approximately)."""

    def __init__(self, rng: random.Random, tokens_per_word: float = 1.3):
        self.rng = rng
        self.tokens_per_word = tokens_per_word

    def words(self, n_tokens: int) -> str:
        n = max(1, round(n_tokens / self.tokens_per_word))
        out, line = [], []
        for i in range(n):
            line.append(self.rng.choice(_WORDS))
            if len(line) >= self.rng.randint(8, 16) or i == n - 1:
                out.append(" ".join(line).capitalize() + ".")
                line = []
        return " ".join(out)

    def tool_output(self, n_tokens: int) -> str:
        """Something shaped like what tools return: file contents, listings, logs."""
        kind = self.rng.choice(["code", "listing", "log"])
        rows, used = [], 0
        while used < n_tokens:
            if kind == "code":
                row = (f"def {self.rng.choice(_IDENT)}_{self.rng.randint(0, 99)}(x, y):  # "
                       + " ".join(self.rng.choice(_WORDS) for _ in range(6)))
            elif kind == "listing":
                row = (f"-rw-r--r-- {self.rng.randint(100, 99999):>6} src/{self.rng.choice(_IDENT)}/"
                       f"{self.rng.choice(_WORDS)}_{self.rng.randint(0, 999)}.py")
            else:
                row = (f"[{self.rng.randint(0, 23):02d}:{self.rng.randint(0, 59):02d}] INFO "
                       + " ".join(self.rng.choice(_WORDS) for _ in range(8)))
            rows.append(row)
            used += round(len(row.split()) * self.tokens_per_word * 1.6)   # symbols split further
        return "\n".join(rows)


def _tool_schemas(gen: TextGen, n_tokens: int) -> list[dict]:
    per_tool = max(20, n_tokens // len(_TOOL_NAMES))
    tools = []
    for name in _TOOL_NAMES:
        tools.append({
            "name": name,
            "description": gen.words(max(8, per_tool - 100)),   # ~100 tokens of JSON around it
            "parameters": {"type": "object",
                           "properties": {"path": {"type": "string", "description": "target path"},
                                          "arg": {"type": "string", "description": "argument"}},
                           "required": ["path"]},
        })
    return tools


def agentic(seed: int = 0, sessions: int = 4, turns: int = 10, prefix_tokens: int = 4096,
            tool_min: int = 200, tool_max: int = 2000, output_tokens: int = 64,
            think_time: float = 0.1, task_tokens: int = 40, tokens_per_word: float = 1.3,
            reply: str = "scripted", tools: bool = True) -> Workload:
    """S concurrent sessions x T turns behind one stable prefix (system prompt + tool schemas).

    Each turn after the first appends a tool result of `tool_min..tool_max` tokens (log-uniform,
    so most results are short and a few are long, as in real agent traces).
    """
    rng = random.Random(f"agentic/{seed}")
    gen = TextGen(rng, tokens_per_word)
    tool_budget = prefix_tokens // 4 if tools else 0
    schemas = _tool_schemas(gen, tool_budget) if tools else []
    system = ("You are a coding agent working in a repository. Follow the rules below.\n"
              + gen.words(prefix_tokens - tool_budget))
    out = []
    for s in range(sessions):
        ts = [Turn(user="Task: " + gen.words(task_tokens), max_tokens=output_tokens, think_time=0.0)]
        for _ in range(1, turns):
            n = round(math.exp(rng.uniform(math.log(tool_min), math.log(tool_max))))
            tool = rng.choice(_TOOL_NAMES)
            ts.append(Turn(
                user=f"Result of {tool}:\n" + gen.tool_output(n),
                max_tokens=output_tokens,
                think_time=round(rng.expovariate(1.0 / think_time), 4) if think_time > 0 else 0.0,
                assistant=f"I will call {tool} next. " + gen.words(output_tokens // 2),
            ))
        out.append(Session(id=f"agentic-{seed}-{s}", arrival=0.0, system=system, turns=ts,
                           tools=schemas, reply=reply))
    params = dict(sessions=sessions, turns=turns, prefix_tokens=prefix_tokens, tool_min=tool_min,
                  tool_max=tool_max, output_tokens=output_tokens, think_time=think_time,
                  task_tokens=task_tokens, tokens_per_word=tokens_per_word, reply=reply, tools=tools)
    return Workload("agentic", seed, params, out, max_concurrency=sessions)


def _open_loop(name: str, seed: int, requests: int, rate: float, prompt: tuple[int, int],
               output_tokens: int, tokens_per_word: float, max_concurrency: int) -> Workload:
    rng = random.Random(f"{name}/{seed}")
    gen = TextGen(rng, tokens_per_word)
    t, out = 0.0, []
    for i in range(requests):
        n = rng.randint(*prompt)
        out.append(Session(id=f"{name}-{seed}-{i}", arrival=round(t, 4),
                           system="You are a helpful assistant.",
                           turns=[Turn(user=gen.words(n) + " What do you think?", max_tokens=output_tokens)]))
        if rate > 0:
            t += rng.expovariate(rate)
    params = dict(requests=requests, rate=rate, prompt_tokens=list(prompt), output_tokens=output_tokens,
                  tokens_per_word=tokens_per_word)
    return Workload(name, seed, params, out, max_concurrency=max_concurrency)


def chat(seed: int = 0, requests: int = 32, rate: float = 1.0, prompt_min: int = 30,
         prompt_max: int = 200, output_tokens: int = 128, tokens_per_word: float = 1.3,
         max_concurrency: int = 0) -> Workload:
    """Short prompts, medium outputs, Poisson arrivals at `rate` requests/s (0 = all at once)."""
    return _open_loop("chat", seed, requests, rate, (prompt_min, prompt_max), output_tokens,
                      tokens_per_word, max_concurrency)


def reasoning(seed: int = 0, requests: int = 8, rate: float = 0.5, prompt_min: int = 30,
              prompt_max: int = 100, output_tokens: int = 512, tokens_per_word: float = 1.3,
              max_concurrency: int = 0) -> Workload:
    """Short prompts, long outputs."""
    return _open_loop("reasoning", seed, requests, rate, (prompt_min, prompt_max), output_tokens,
                      tokens_per_word, max_concurrency)


def long_context(seed: int = 0, document_tokens: int = 6000, questions: int = 6,
                 output_tokens: int = 64, concurrency: int = 2, tokens_per_word: float = 1.3) -> Workload:
    """One long document, several independent questions about it (the document is the shared prefix)."""
    rng = random.Random(f"long-context/{seed}")
    gen = TextGen(rng, tokens_per_word)
    document = gen.words(document_tokens)
    system = "Answer questions about the document below.\n<document>\n" + document + "\n</document>"
    out = [Session(id=f"long-context-{seed}-{i}", arrival=0.0, system=system,
                   turns=[Turn(user=f"Question {i + 1}: " + gen.words(20) + "?", max_tokens=output_tokens)])
           for i in range(questions)]
    params = dict(document_tokens=document_tokens, questions=questions, output_tokens=output_tokens,
                  concurrency=concurrency, tokens_per_word=tokens_per_word)
    return Workload("long-context", seed, params, out, max_concurrency=concurrency)


# Standard-library modules whose source makes a realistic file to edit (4-25 KB of Python each;
# a file is cut at a line boundary to the requested size). Read from this interpreter's stdlib,
# so the text is real code, needs no download, and is the same for every target of one run.
EDIT_SOURCES = ("fnmatch", "colorsys", "glob", "copy", "sched", "reprlib", "numbers", "graphlib",
                "getopt", "netrc", "linecache", "codeop", "shelve", "filecmp", "hmac", "queue",
                "shlex", "string", "operator", "textwrap", "timeit", "zipapp", "quopri", "types",
                "cmd", "tabnanny")


def _stdlib_source(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def _cut(text: str, max_chars: int) -> str:
    """The leading lines of `text` that fit in `max_chars` (at least one line)."""
    if len(text) <= max_chars:
        return text.rstrip("\n")
    cut = text.rfind("\n", 0, max_chars)
    return text[:cut if cut > 0 else max_chars].rstrip("\n")


def edit(seed: int = 0, requests: int = 4, rate: float = 0.0, file_min: int = 1000,
         file_max: int = 3000, tokens_per_char: float = 0.27, max_concurrency: int = 1,
         output_tokens: int | None = None, tokens_per_word: float = 1.3) -> Workload:
    """"Edit a file": the prompt holds a 1-3K-token source file (a standard-library module) and
    asks for the whole file back with one small change (rename a function). The answer re-emits
    the file almost verbatim, the best case for proposals taken from the context (speculative
    decoding). Output length (`max_tokens`): room for the whole file back, as a real edit
    request asks, so decoding dominates the request: the file's token count estimated from
    above (`tokens_per_char` is an average: SmolLM2's tokenizer measured 0.23-0.29 per file
    around 0.27, hence 15% more) plus 64 for the fence and the change, or `output_tokens`.
    Requests are single-turn and sent at temperature 0 like every bench request;
    `max_concurrency` 1 is batch 1. `tokens_per_word` is accepted for a uniform interface and
    unused."""
    rng = random.Random(f"edit/{seed}")
    sources = [(name, text) for name in EDIT_SOURCES if (text := _stdlib_source(name))]
    if not sources:
        raise ValueError("edit workload: no standard-library source files found")
    t, out = 0.0, []
    for i in range(requests):
        name, text = sources[rng.randrange(len(sources))]
        n_tokens = rng.randint(file_min, max(file_min, file_max))
        body = _cut(text, max(200, round(n_tokens / tokens_per_char)))
        defs = sorted(set(re.findall(r"^\s*def ([A-Za-z_]\w*)\(", body, re.M)))
        if defs:
            old = rng.choice(defs)
            change = f"rename the function `{old}` to `{old}_v2` everywhere it appears"
        else:
            change = "add the comment `# reviewed` as the first line"
        user = (f"Here is the file `{name}.py`:\n\n```python\n{body}\n```\n\n"
                f"Make one change: {change}. Reply with the complete updated file in one "
                f"```python block and nothing else.")
        est = round(len(body) * tokens_per_char * 1.15) + 64
        out.append(Session(id=f"edit-{seed}-{i}", arrival=round(t, 4),
                           system="You are a careful code editor. You return whole files.",
                           turns=[Turn(user=user, max_tokens=output_tokens or est)]))
        if rate > 0:
            t += rng.expovariate(rate)
    params = dict(requests=requests, rate=rate, file_min=file_min, file_max=file_max,
                  tokens_per_char=tokens_per_char, max_concurrency=max_concurrency,
                  output_tokens=output_tokens)
    return Workload("edit", seed, params, out, max_concurrency=max_concurrency)


def build_workload(name: str, seed: int = 0, **params: Any) -> Workload:
    makers = {"agentic": agentic, "chat": chat, "long-context": long_context, "reasoning": reasoning,
              "edit": edit}
    if name not in makers:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    return makers[name](seed=seed, **params)


# ---------------------------------------------------------------------------- JSONL traces

def write_trace(workload: Workload, path: str) -> None:
    """One JSON object per line: a header line, then one line per session."""
    with open(path, "w", encoding="utf-8") as f:
        header = {"type": "workload", "name": workload.name, "seed": workload.seed,
                  "params": workload.params, "max_concurrency": workload.max_concurrency}
        f.write(json.dumps(header) + "\n")
        for s in workload.sessions:
            f.write(json.dumps({"type": "session", **asdict(s)}) + "\n")


def read_trace(path: str) -> Workload:
    """Replay a trace written by `write_trace` (or by hand: only session lines are required)."""
    header: dict[str, Any] = {}
    sessions: list[Session] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
            kind = obj.pop("type", "session")
            if kind == "workload":
                header = obj
                continue
            try:
                turns = [Turn(**t) for t in obj.pop("turns")]
                sessions.append(Session(turns=turns, **obj))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a session ({exc})") from None
    return Workload(header.get("name", "trace"), header.get("seed", 0), header.get("params", {}),
                    sessions, header.get("max_concurrency", 0))
