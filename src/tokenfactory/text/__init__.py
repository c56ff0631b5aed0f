"""Text in, text out (stations 4, 9 and 11 of the request trace).

- `tokenizer`: a Hugging Face tokenizer directory without `transformers`; chat templates.
- `chat_template`: sandboxed Jinja rendering, byte-compatible with transformers.
- `detokenizer`: token ids back to streamed text, with stop strings.
- `tool_parsers`: the tool-call format registry (lookup, detection from the template,
  rendering, the call grammar); `tool_formats/`: one module per format (Hermes `<tool_call>`,
  Llama 3 JSON, Mistral `[TOOL_CALLS]`, Qwen3-Coder XML); `reasoning_parser`: the `<think>`
  splitter.
- `reasoning`: thinking budgets / effort as a grammar that closes the `<think>` section.
- `demo_tokenizer`: the locally trained tokenizer of the built-in demo model.
"""

from tokenfactory.text.chat_template import ChatTemplateError
from tokenfactory.text.detokenizer import DetokenizerUpdate, IncrementalDetokenizer
from tokenfactory.text.tokenizer import Tokenizer, TokenizerLoadError
from tokenfactory.text.tool_parsers import (
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallParser,
    ToolCallStart,
    detect_tool_parser,
    get_tool_parser,
    render_tool_call_text,
)

__all__ = [
    "ChatTemplateError",
    "DetokenizerUpdate",
    "IncrementalDetokenizer",
    "TextDelta",
    "Tokenizer",
    "TokenizerLoadError",
    "ToolCallArgsDelta",
    "ToolCallEnd",
    "ToolCallParser",
    "ToolCallStart",
    "detect_tool_parser",
    "get_tool_parser",
    "render_tool_call_text",
]
