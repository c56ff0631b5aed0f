"""Tool-call formats, one module per family: how a model writes its calls, parsed back from
the text as it streams (the contract: text/tool_parsers.py; the shared pieces:
text/tool_parser_base.py).

- ``hermes``: ``<tool_call>{json}</tool_call>`` (Hermes, Qwen2.5, the demo model)
- ``llama3_json``: the whole message is JSON calls (Llama 3.1-3.3 custom tools)
- ``mistral``: ``[TOOL_CALLS]`` with a JSON list or ``name[ARGS]{...}``
- ``qwen3_coder``: XML ``<function=f><parameter=x>`` calls, and ``qwen3_coder_grammar``
  constraining them
"""
from tokenfactory.text.tool_formats.hermes import HermesToolParser
from tokenfactory.text.tool_formats.llama3_json import Llama3JsonToolParser
from tokenfactory.text.tool_formats.mistral import MistralArgsToolParser, MistralToolParser
from tokenfactory.text.tool_formats.qwen3_coder import (Qwen3CoderToolParser,
                                                        render_qwen3_coder_call, typed_value)
from tokenfactory.text.tool_formats.qwen3_coder_grammar import qwen3_coder_call_grammar

__all__ = ["HermesToolParser", "Llama3JsonToolParser", "MistralToolParser",
           "MistralArgsToolParser", "Qwen3CoderToolParser", "qwen3_coder_call_grammar",
           "render_qwen3_coder_call", "typed_value"]
