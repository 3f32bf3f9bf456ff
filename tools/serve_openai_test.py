"""Checks `e4m3 serve` with the official `openai` client: models, chat (plain and streamed), completions
(plain and streamed), stop strings, usage, logprobs and error statuses. Few tokens, greedy, so it is fast.

    python tools/serve_openai_test.py --base-url http://127.0.0.1:8000/v1 --api-key KEY --model NAME
"""

import argparse
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=120)
    checks = 0

    def check(cond, what):
        nonlocal checks
        if not cond:
            raise AssertionError(what)
        checks += 1

    models = client.models.list()
    check([m.id for m in models.data] == [a.model], f"models: {models}")
    check(models.data[0].owned_by == "e4m3", "owned_by")

    msgs = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=a.model, messages=msgs, max_tokens=8, temperature=0)
    text = r.choices[0].message.content
    check(r.object == "chat.completion" and r.id.startswith("chatcmpl-"), f"chat ids: {r}")
    check(r.choices[0].message.role == "assistant", "role")
    check(isinstance(text, str) and len(text) > 0, f"chat text: {text!r}")
    check(r.choices[0].finish_reason in ("stop", "length"), "finish_reason")
    u = r.usage
    check(u.total_tokens == u.prompt_tokens + u.completion_tokens and 0 < u.completion_tokens <= 8, f"usage {u}")

    stream = client.chat.completions.create(
        model=a.model, messages=msgs, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                deltas.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    check("".join(deltas) == text, f"stream {''.join(deltas)!r} != {text!r}")
    check(finish == r.choices[0].finish_reason, "stream finish_reason")
    check(usage is not None and usage.completion_tokens == u.completion_tokens, f"stream usage {usage}")

    r = client.chat.completions.create(
        model=a.model, messages=msgs, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    lp = r.choices[0].logprobs.content
    check(len(lp) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in lp), f"logprobs {lp}")
    check(all(t.logprob <= 0 for t in lp), "logprob <= 0")

    c = client.completions.create(model=a.model, prompt="The capital of France is", max_tokens=6, temperature=0)
    check(c.object == "text_completion" and len(c.choices[0].text) > 0, f"completion {c}")
    check(c.usage.completion_tokens <= 6, "completion usage")
    pieces = [ch.choices[0].text for ch in client.completions.create(
        model=a.model, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if ch.choices]
    check("".join(pieces) == c.choices[0].text, f"completion stream {pieces} vs {c.choices[0].text!r}")

    words = c.choices[0].text.split()
    if len(words) >= 2:
        s = client.completions.create(model=a.model, prompt="The capital of France is", max_tokens=6,
                                      temperature=0, stop=[words[1]])
        check(s.choices[0].finish_reason == "stop" and words[1] not in s.choices[0].text, f"stop {s}")

    for kwargs, status in [
        (dict(model="no-such-model", messages=msgs, max_tokens=2), 404),
        (dict(model=a.model, messages=msgs, max_tokens=2, n=2), 400),
        (dict(model=a.model, messages=msgs, max_tokens=2, temperature=-1), 400),
        (dict(model=a.model, messages=msgs, max_tokens=100000), 400),
    ]:
        try:
            client.chat.completions.create(**kwargs)
            check(False, f"{kwargs} should fail")
        except openai.APIStatusError as e:
            check(e.status_code == status, f"{kwargs}: status {e.status_code}, want {status}")
    # Tools: "auto" (the default with tools) needs a tool-call parser (as vLLM); "none" declares them only.
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    for kwargs in [dict(tools=tools), dict(tools=tools, tool_choice="required")]:
        try:
            client.chat.completions.create(model=a.model, messages=msgs, max_tokens=2, **kwargs)
            check(False, f"{kwargs} should fail without --tool-call-parser")
        except openai.BadRequestError as e:
            check("tool_choice" in str(e), f"{kwargs}: {e}")
    r = client.chat.completions.create(model=a.model, messages=msgs, max_tokens=2, temperature=0,
                                       tools=tools, tool_choice="none",
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # (Gemma 3's template has no tool syntax: the prompt is the one without tools.)
    check(r.choices[0].message.tool_calls is None and r.usage.prompt_tokens == u.prompt_tokens,
          f"tool_choice none: {r}")

    try:
        openai.OpenAI(base_url=a.base_url, api_key="wrong", max_retries=0).models.list()
        check(False, "a wrong key should fail")
    except openai.AuthenticationError:
        checks += 1

    print(f"openai client: {checks} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
