"""Shared by the tool-use tests: an OpenAI-format tool-use conversation and a small model folder
whose chat template renders tools, tool calls and tool results (ChatML with Qwen-style calls)."""

from __future__ import annotations

import shutil
from pathlib import Path

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOL_ROW = {
    "id": "tool-1",
    "source": "tools",
    "task": "tool_use",
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": '{"temp": 18}', "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 18 degrees in Paris."},
    ],
}
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for tool in tools %}{{ tool | tojson }}\n"
    "{%- endfor %}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "<|im_start|>assistant\n{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{%- for call in message['tool_calls'] %}<tool_call>{{ call['function'] | tojson }}"
    "</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message['role'] == 'tool' %}<|im_start|>tool\n{{ message['content'] }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def tool_model_folder(target: Path) -> Path:
    """The tiny BPE model with ``TOOL_TEMPLATE``, as a local model folder."""
    from slap_ray.assets import load_tokenizer, resolve_model_path

    shutil.copytree(resolve_model_path("tiny-bpe"), target)
    tokenizer = load_tokenizer(str(target))
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(str(target))
    return target
