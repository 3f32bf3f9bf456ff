"""Expected Gemma 4 chat-template renderings, made by transformers.

Renders the conversations below with the Gemma 4 chat template committed at
tests/fixtures/gemma4-chat/chat_template.jinja through
`transformers.utils.chat_template_utils.render_jinja_template`, the function
`PreTrainedTokenizerBase.apply_chat_template` calls to render (same Jinja2
sandbox, trim_blocks/lstrip_blocks, tojson override, raise_exception, namespace,
message dicts made plain, reasoning fields aliased). Special tokens are passed as
apply_chat_template passes them (bos_token="<bos>", eos_token="<eos>" from the
Gemma 4 tokenizer's special_tokens_map), so no tokenizer object is needed.

Writes tests/fixtures/gemma4-chat/cases.json:
  {"template_sha256", "bos_token", "eos_token", "cases": [{"name", "messages",
   "tools" (or null), "kwargs" (chat_template_kwargs), "add_generation_prompt",
   "rendered"}]}

Run: /tmp/oracle/bin/python tools/make_gemma4_chat_fixtures.py
"""

import hashlib
import json
import pathlib

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIR = ROOT / "tests" / "fixtures" / "gemma4-chat"
TEMPLATE = (DIR / "chat_template.jinja").read_text()
BOS, EOS = "<bos>", "<eos>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "Forecast days"},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_docs",
        "description": "Search the documentation.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "description": "Optional filters",
                    "properties": {
                        "lang": {"type": "string"},
                        "max_results": {"type": "number"},
                    },
                    "required": ["lang"],
                },
                "tags": {"type": "array", "items": {"type": "string"}},
                "exact": {"type": "boolean", "nullable": True},
            },
            "required": ["query"],
        },
    },
}
NO_PARAMS = {
    "type": "function",
    "function": {"name": "get_time", "description": "The current time."},
}

CALL_WEATHER = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
}
CALL_SEARCH = {
    "id": "call_2",
    "type": "function",
    "function": {
        "name": "search_docs",
        "arguments": {
            "query": "fp8 {scales}, \"quoted\"",
            "filters": {"lang": "en", "max_results": 2.5},
            "tags": ["a", "b"],
            "exact": False,
        },
    },
}

CASES = [
    ("user_only", [{"role": "user", "content": "  Hello there \n"}], None, {}, True),
    ("user_only_no_gen", [{"role": "user", "content": "Hello"}], None, {}, False),
    (
        "system_multi_turn",
        [
            {"role": "system", "content": "You are terse. "},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        None,
        {},
        True,
    ),
    (
        "developer_role",
        [{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        None,
        {},
        True,
    ),
    ("thinking_on", [{"role": "user", "content": "Why is the sky blue?"}], None, {"enable_thinking": True}, True),
    (
        "thinking_on_system",
        [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "17*23?"}],
        None,
        {"enable_thinking": True},
        True,
    ),
    ("thinking_off_explicit", [{"role": "user", "content": "Hi"}], None, {"enable_thinking": False}, True),
    (
        "assistant_thought_stripped",
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<|channel>thought\nhidden reasoning<channel|>The answer."},
            {"role": "user", "content": "Q2"},
        ],
        None,
        {"enable_thinking": True},
        True,
    ),
    ("tools_declared", [{"role": "user", "content": "Weather in Paris?"}], [WEATHER, SEARCH, NO_PARAMS], {}, True),
    (
        "tools_with_system_and_thinking",
        [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather?"}],
        [WEATHER],
        {"enable_thinking": True},
        True,
    ),
    (
        "tool_call_and_response",
        [
            {"role": "user", "content": "Weather in Paris for 3 days?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL_WEATHER]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
        [WEATHER],
        {},
        True,
    ),
    (
        "tool_calls_parallel_with_reasoning",
        [
            {"role": "user", "content": "Weather and docs?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "I need two tools.",
                "tool_calls": [CALL_WEATHER, CALL_SEARCH],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
            {"role": "tool", "tool_call_id": "call_2", "name": "search_docs", "content": [{"type": "text", "text": "doc hit"}]},
        ],
        [WEATHER, SEARCH],
        {"enable_thinking": True},
        True,
    ),
    (
        "tool_round_trip_then_answer",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [CALL_WEATHER]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny in Paris."},
            {"role": "user", "content": "Thanks!"},
        ],
        [WEATHER],
        {},
        True,
    ),
    (
        "tool_call_no_response_yet",
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [CALL_WEATHER]},
        ],
        [WEATHER],
        {},
        True,
    ),
    (
        "content_parts",
        [{"role": "user", "content": [{"type": "text", "text": " part one "}, {"type": "text", "text": "part two"}]}],
        None,
        {},
        True,
    ),
    ("unicode", [{"role": "user", "content": "Grüße, 東京 🌸"}], None, {}, True),
    (
        "tool_property_without_type",
        [{"role": "user", "content": "x"}],
        [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {
            "type": "object", "properties": {"x": {"description": "untyped"}}}}}],
        {},
        True,
    ),
    (
        "tool_call_null_and_float_arguments",
        [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "f", "arguments": {"a": None, "b": 1.0, "c": 1e20, "d": -0.5, "e": True}}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"},
        ],
        None,
        {},
        True,
    ),
]


def main():
    cases = []
    for name, messages, tools, kwargs, add_gen in CASES:
        rendered = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=TEMPLATE,
            add_generation_prompt=add_gen,
            bos_token=BOS,
            eos_token=EOS,
            **kwargs,
        )[0][0]
        cases.append(
            {
                "name": name,
                "messages": messages,
                "tools": tools,
                "kwargs": kwargs,
                "add_generation_prompt": add_gen,
                "rendered": rendered,
            }
        )
    out = {
        "generator": f"tools/make_gemma4_chat_fixtures.py (transformers {transformers.__version__})",
        "template_sha256": hashlib.sha256(TEMPLATE.encode()).hexdigest(),
        "bos_token": BOS,
        "eos_token": EOS,
        "cases": cases,
    }
    (DIR / "cases.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {DIR / 'cases.json'}")


if __name__ == "__main__":
    main()
