"""A small byte-level BPE tokenizer trained locally, for the built-in demo model.

Nothing is downloaded: the training corpus is generated here, deterministically, from word lists,
sentence patterns, JSON tool calls, Python snippets and the chat template itself. Byte-level BPE
has all 256 bytes in its alphabet, so any unicode text encodes (rare characters as byte tokens).
The output directory is a regular Hugging Face tokenizer directory that `transformers` loads too.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from tokenfactory.text.tokenizer import Tokenizer

__all__ = ["train_demo_tokenizer", "demo_chat_template", "DEMO_SPECIAL_TOKENS", "DEMO_TOOL_MARKERS"]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Control tokens: special (skipped when decoding with skip_special_tokens=True).
DEMO_SPECIAL_TOKENS = (BOS_TOKEN, "<|im_start|>", EOS_TOKEN, PAD_TOKEN)
# Tool markers: single tokens, but ordinary text for decoding, so tool parsers see them.
DEMO_TOOL_MARKERS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


def demo_chat_template() -> str:
    """The demo model's ChatML/Hermes chat template (shipped as package data)."""
    return resources.files("tokenfactory.text").joinpath("templates/demo_chatml.jinja").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- corpus

_SUBJECTS = """the server|a request|the model|our scheduler|the cache|this engine|a user|the client|every token|
the tokenizer|a developer|the team|my assistant|the kernel|a batch|the router|each replica|the prompt|
the weather|the city|a small dog|the river|an old library|the market|a student|the teacher|the garden|
the ship|a young engineer|the committee|the museum|our neighbour|the orchestra|a quiet village""".replace(
    "\n", ""
).split("|")
_VERBS = """reads|writes|computes|sends|returns|stores|evicts|schedules|streams|measures|builds|explains|
finds|keeps|loads|splits|merges|checks|repeats|answers|visits|paints|carries|opens|closes|follows|
describes|prepares|improves|counts|shares|watches|remembers|forgets|chooses|teaches|learns""".replace(
    "\n", ""
).split("|")
_OBJECTS = """the next block|a long document|three new tokens|the whole context|a cached prefix|the answer|
the logits|a JSON object|the final message|an empty list|the file on disk|a short poem|the latest report|
the blue door|a cup of coffee|the morning train|a map of the city|the old bridge|a red apple|the results|
two hundred pages|the quarterly budget|a detailed plan|the source code|a careful review|the first chapter""".replace(
    "\n", ""
).split("|")
_ADVERBS = """quickly|slowly|carefully|again|today|every morning|in parallel|without delay|at night|
twice|on time|by hand|in order|at once|before lunch|after the meeting|on the weekend|as expected""".replace(
    "\n", ""
).split("|")
_CONNECTIVES = ["and then", "but", "because", "so", "while", "although", "after", "before", "when", "since"]
_QUESTIONS = [
    "What is the weather like in {city}?",
    "How many tokens does this prompt use?",
    "Can you summarize the document about {topic}?",
    "Why is the cache hit rate so low for {topic}?",
    "Please write a short function that {task}.",
    "Where can I find the nearest {place} in {city}?",
    "Could you explain {topic} in simple terms?",
    "What time is it in {city} right now?",
]
_CITIES = ["Paris", "Tokyo", "Berlin", "New York", "San Francisco", "London", "Madrid", "Toronto", "Sydney",
           "Cairo", "Lima", "Oslo", "Seoul", "Mumbai", "Nairobi", "Vancouver", "Zurich", "Lisbon"]
_TOPICS = ["prefix caching", "continuous batching", "rotary embeddings", "paged attention", "tool use",
           "speculative decoding", "quantization", "the KV cache", "tensor parallelism", "photosynthesis",
           "the French revolution", "black holes", "compound interest", "machine learning"]
_TASKS = ["reverses a string", "sorts a list of numbers", "parses a JSON file", "counts words in a text",
          "computes the factorial", "reads a CSV file", "merges two dictionaries", "checks for primes"]
_PLACES = ["coffee shop", "train station", "pharmacy", "bookstore", "museum", "park", "hospital", "bakery"]
_TOOLS = [
    ("get_weather", {"location": "{city}", "unit": "celsius"}),
    ("search_web", {"query": "{topic}", "max_results": 5}),
    ("read_file", {"path": "/home/user/project/{file}"}),
    ("write_file", {"path": "src/{file}", "content": "print('hello')\n"}),
    ("run_command", {"command": "ls -la", "timeout": 30}),
    ("get_time", {"timezone": "Europe/{city}"}),
    ("calculate", {"expression": "2 * (3 + 4)"}),
]
_FILES = ["main.py", "README.md", "config.json", "app.js", "index.html", "notes.txt", "utils.rs", "Makefile"]
_CODE = [
    "def {name}(x):\n    return x * 2\n",
    "for i in range(10):\n    print(i, i ** 2)\n",
    "import json\n\nwith open('data.json') as f:\n    data = json.load(f)\n",
    "class {Name}:\n    def __init__(self, value: int) -> None:\n        self.value = value\n",
    "if __name__ == '__main__':\n    main()\n",
    "const {name} = (a, b) => a + b;\nconsole.log({name}(1, 2));\n",
    "fn {name}(v: &[u32]) -> u32 {{\n    v.iter().sum()\n}}\n",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;\n",
    "$ pip install -e .\n$ pytest -q tests/\n",
]
_UNICODE = ["café", "naïve", "über", "señor", "Ærø", "日本語のテキスト", "中文文本", "Привет, мир", "こんにちは",
            "안녕하세요", "مرحبا", "γειά σου", "→ ✓ ★ ♥", "😀 🚀 🎉", "€100 £50 ¥300", "½ ¼ ¾ ° ±"]


_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "ch",
           "cl", "dr", "fl", "gr", "pl", "pr", "sh", "sk", "sl", "sp", "st", "str", "th", "tr", "wh"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "oo", "ay", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rs", "st", "ck", "sh", "tion", "ment", "ing", "ed"]


def _lexicon(rng: random.Random, size: int) -> list[str]:
    """Made-up words from English-like syllables: enough variety to fill an 8K BPE vocabulary."""
    words: set[str] = set()
    while len(words) < size:
        n = rng.choice([1, 2, 2, 3, 3, 4])
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(n)))
    return sorted(words)


def _prose(rng: random.Random, lexicon: list[str]) -> str:
    """A paragraph of made-up words with a Zipf-like frequency profile, punctuation and numbers."""
    out = []
    for _ in range(rng.randint(20, 60)):
        word = lexicon[min(int(rng.paretovariate(0.9)) - 1, len(lexicon) - 1) * 7919 % len(lexicon)]
        if rng.random() < 0.08:
            word = word.capitalize()
        if rng.random() < 0.04:
            word = str(rng.randint(0, 5000))
        out.append(word + (rng.choice([",", ".", ";", ":", "!", "?"]) if rng.random() < 0.1 else ""))
    return " ".join(out)


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS).strip()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.5:
        s += f" {rng.choice(_ADVERBS)}"
    if rng.random() < 0.3:
        s += f" {rng.choice(_CONNECTIVES)} {rng.choice(_SUBJECTS).strip()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    s = s[0].upper() + s[1:]
    return s + rng.choice([".", ".", ".", "!", "?", ";"])


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        city=rng.choice(_CITIES), topic=rng.choice(_TOPICS), task=rng.choice(_TASKS),
        place=rng.choice(_PLACES), file=rng.choice(_FILES),
    )


def _tool_call(rng: random.Random) -> tuple[str, dict]:
    name, args = rng.choice(_TOOLS)
    filled = {k: (_fill(v, rng) if isinstance(v, str) else v) for k, v in args.items()}
    return name, filled


def _conversation(rng: random.Random) -> list[dict]:
    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "You are a helpful assistant. " + _sentence(rng)})
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": _fill(rng.choice(_QUESTIONS), rng)})
        if rng.random() < 0.4:
            name, args = _tool_call(rng)
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]})
            messages.append({"role": "tool", "content": json.dumps({"result": _sentence(rng), "ok": True})})
        messages.append({"role": "assistant", "content": " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))})
    return messages


def build_demo_corpus(n_documents: int = 2500, seed: int = 1234) -> list[str]:
    """The training corpus: deterministic for a given seed (a few hundred KB of varied text)."""
    from tokenfactory.text.chat_template import render_chat_template

    rng = random.Random(seed)
    template = demo_chat_template()
    tools_schema = [
        {"type": "function", "function": {"name": name, "description": f"Call {name.replace('_', ' ')}.",
                                          "parameters": {"type": "object", "properties": {
                                              k: {"type": "string" if isinstance(v, str) else "integer"}
                                              for k, v in args.items()}, "required": list(args)}}}
        for name, args in _TOOLS
    ]
    lexicon = _lexicon(rng, 30000)
    docs: list[str] = [template]
    docs.extend(_prose(rng, lexicon) for _ in range(n_documents * 2))
    docs.extend(" ".join(rng.sample(lexicon, 40)) for _ in range(len(lexicon) // 40 * 3))
    for i in range(n_documents):
        kind = i % 6
        if kind == 0:
            docs.append(" ".join(_sentence(rng) for _ in range(rng.randint(3, 10))))
        elif kind == 1:
            tools = tools_schema if rng.random() < 0.5 else None
            docs.append(render_chat_template(template, _conversation(rng), tools=tools, bos_token=BOS_TOKEN,
                                             eos_token=EOS_TOKEN, add_generation_prompt=False))
        elif kind == 2:
            name, args = _tool_call(rng)
            docs.append("<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>")
        elif kind == 3:
            code = rng.choice(_CODE)
            fname = rng.choice(["helper", "compute", "process", "handle", "transform", "load"])
            docs.append(code.format(name=fname, Name=fname.capitalize()))
        elif kind == 4:
            record = {"id": rng.randint(0, 10**6), "name": rng.choice(_SUBJECTS).strip(),
                      "tags": rng.sample(_TOPICS, 2), "score": round(rng.random() * 100, 2),
                      "active": rng.random() < 0.5, "city": rng.choice(_CITIES)}
            docs.append(json.dumps(record, indent=rng.choice([None, 2])))
        else:
            docs.append(f"{rng.choice(_UNICODE)} {_sentence(rng)} {rng.randint(0, 99999)} {rng.choice(_UNICODE)}")
    return docs


# ---------------------------------------------------------------------------- training


def train_demo_tokenizer(out_dir: str | Path, vocab_size: int = 8192) -> Tokenizer:
    """Train the demo byte-level BPE (total vocabulary `vocab_size`, added tokens included) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = _HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(DEMO_TOOL_MARKERS),
        min_frequency=2,
        special_tokens=list(DEMO_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(build_demo_corpus(), trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in DEMO_TOOL_MARKERS])
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    bpe.save(str(out / "tokenizer.json"))

    template = demo_chat_template()
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "chat_template": template,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return Tokenizer.from_dir(out)
