"""The OpenAI-compatible `/v1` API after a third review, through a real gateway with the real default GGUF model and
the official `openai` client (raw HTTP where the wire shape itself is checked): JSON answers keep the schema's order
of properties, a tool without `parameters` takes none, OpenAI's nullable fields take null as their default, errors
name the field a union-typed value was sent to, and stream chunks have OpenAI's keys."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway

from bkg_kernel.models.defaults import DEFAULT_LLM

MODEL = DEFAULT_LLM
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("v1-review3") / "data", plugins=["llmserver"],
                      env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    yield g
    g.stop()


@pytest.fixture(scope="module")
def oai(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)


def sse(gw: Gateway, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a stream, read raw (not through a client that fills in missing keys)."""
    events = []
    with gw.client() as c, c.stream("POST", path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_structured_output_keeps_the_schema_s_order_of_properties(oai: openai.OpenAI) -> None:
    """Found by a review: the schema was key-sorted before it became a grammar, so `answer` came before the
    `reasoning` that should lead to it (OpenAI and llama.cpp keep the schema's order)."""
    schema = {
        "type": "object",
        "properties": {"reasoning": {"type": "string", "maxLength": 40}, "answer": {"type": "integer"}},
        "required": ["reasoning", "answer"],
    }
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2 + 3? Reason first, then answer."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}},
    )
    data = json.loads(r.choices[0].message.content or "")
    assert list(data) == ["reasoning", "answer"] and isinstance(data["answer"], int)


def test_a_forced_tool_call_names_the_function_before_its_arguments(gw: Gateway) -> None:
    """Same cause: the tool-call grammar (bkg's `{"name": ..., "arguments": ...}`, as its prompt asks for) was
    key-sorted, so the model wrote the arguments before the function's name. A call cut short by `max_tokens` is
    sent as the text it is: it begins with the name."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [tool],
            "tool_choice": "required", "temperature": 0, "max_tokens": 6, "stream": True}  # fmt: skip
    events = sse(gw, "/v1/chat/completions", body)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert finish == ["length"]
    assert re.match(r'\{\s*"name"\s*:', text), text  # old: '{ "arguments": {...'


def test_a_tool_without_parameters_is_called_with_no_arguments(oai: openai.OpenAI) -> None:
    """Found by a review: a function declared without `parameters` was given any object as its arguments
    (`{"blue": 2, "red": 4}`); OpenAI reads it as a function that takes none."""
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Call the tool f."}],
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="required",
        temperature=0,
        max_tokens=40,
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls
    assert calls[0].function.name == "f" and calls[0].function.arguments == "{}"  # type: ignore[union-attr]


def test_null_is_the_default_of_openai_s_nullable_fields(oai: openai.OpenAI, gw: Gateway) -> None:
    """Found by a review: `temperature=None` (and top_p, n, stream, the penalties) was a 400 "Input should be a
    valid number"; OpenAI's API marks them nullable, null meaning the default. The answer with nulls is the answer
    with the fields left out."""
    ask: dict[str, Any] = {"model": MODEL, "messages": HI, "max_tokens": 8, "seed": 11}
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty")}
    with gw.client() as c:
        plain = c.post("/v1/chat/completions", json=ask)
        nulled = c.post("/v1/chat/completions", json={**ask, **nulls})
        assert plain.status_code == 200 and nulled.status_code == 200, nulled.text
        said = plain.json()["choices"][0]["message"]["content"]
        assert said and nulled.json()["choices"][0]["message"]["content"] == said
        prompt: dict[str, Any] = {"model": MODEL, "prompt": "One, two,", "max_tokens": 4, "seed": 11}
        done = c.post("/v1/completions", json={**prompt, **nulls, "echo": None})
        assert done.status_code == 200, done.text
        assert done.json()["choices"][0]["text"] == c.post("/v1/completions", json=prompt).json()["choices"][0]["text"]
    sdk = oai.chat.completions.create(**ask, temperature=None, top_p=None)  # the SDK sends them as null
    assert sdk.choices[0].message.content == said


def test_top_p_zero_keeps_only_the_most_likely_token(gw: Gateway) -> None:
    """Found by a review: `top_p=0` was refused (OpenAI takes 0 to 1). Nucleus sampling with p=0 keeps the most
    likely token alone: at temperature 1 the answer is the greedy one, whatever the seed."""
    ask: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}],
                           "max_tokens": 10}  # fmt: skip
    with gw.client() as c:
        greedy = c.post("/v1/chat/completions", json={**ask, "temperature": 0}).json()["choices"][0]["message"]
        for seed in (1, 2):
            r = c.post("/v1/chat/completions", json={**ask, "temperature": 1, "top_p": 0, "seed": seed})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == greedy["content"]


def test_stream_options_without_stream_is_refused(oai: openai.OpenAI) -> None:
    """Found by a review: OpenAI answers 400 naming `stream_options` on a request that does not stream; it was a
    200 (the caller's include_usage silently meant nothing)."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, stream_options={"include_usage": True})  # type: ignore[arg-type]
    assert refused.value.param == "stream_options" and "stream" in refused.value.message
    with pytest.raises(openai.BadRequestError) as also:
        oai.completions.create(model=MODEL, prompt="a", max_tokens=2, stream_options={"include_usage": True})
    assert also.value.param == "stream_options"


@pytest.mark.parametrize(
    ("path", "body", "param", "said"),
    [
        ("/v1/embeddings", {"input": 5}, "input", "input: should be a string or a list of strings"),
        ("/v1/chat/completions", {"messages": HI, "stop": 5}, "stop", "stop: should be a string or a list of strings"),
        ("/v1/chat/completions", {"messages": HI, "tool_choice": 5}, "tool_choice",
         "tool_choice: should be a string or an object"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
         "messages.0.content: should be a string or a list of objects"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [5]}]}, "messages.0.content.0",
         "messages.0.content.0: Input should be a valid dictionary"),
        ("/v1/completions", {"prompt": 5}, "prompt", "prompt: should be a string or a list of strings"),
        ("/v1/embeddings", {"input": ["a", 5]}, "input.1", "input.1: Input should be a valid string"),
    ],
)  # fmt: skip
def test_errors_name_the_field_not_pydantic_s_union_branch(
    gw: Gateway, path: str, body: dict[str, Any], param: str, said: str
) -> None:
    """Found by a review: a field that takes several types was named with pydantic's branch (`input.str`,
    `messages.0.content.str`), a parameter that does not exist, and said only what the first branch takes."""
    with gw.client() as c:
        r = c.post(path, json={"model": MODEL, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["message"] == said, err


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/embeddings", {"input": [[1, 2, 3]]}, "input"),
        ("/v1/embeddings", {"input": [1, 2, 3]}, "input"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2], [3]]}, "prompt"),
    ],
)
def test_token_ids_are_refused_with_a_word_on_them(gw: Gateway, path: str, body: dict[str, Any], param: str) -> None:
    """Found by a review: token ids (LangChain's OpenAIEmbeddings sends them by default) were "input.str: Input
    should be a valid string", or for a prompt "List should have at most 1 items"."""
    with gw.client() as c:
        r = c.post(path, json={"model": MODEL, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param, err
    assert err["message"].startswith(f"{param}: token ids are not accepted") and "send text" in err["message"]
    if path == "/v1/embeddings":
        assert "check_embedding_ctx_length=False" in err["message"]


def test_stream_chunks_have_openai_s_keys(gw: Gateway) -> None:
    """Found by a review: the first chat chunk had no `finish_reason` nor `logprobs` (null in OpenAI's), and with
    `include_usage` the chunks before the last had no `"usage": null`. Every choice now has OpenAI's keys, every
    chunk with choices says `usage` null, and the last chunk has no choices and the usage."""
    body = {"model": MODEL, "messages": HI, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = sse(gw, "/v1/chat/completions", body)
    *chunks, last = events
    assert len(chunks) >= 3 and last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    first = chunks[0]["choices"][0]
    assert first == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}  # fmt: skip
    for chunk in chunks:
        assert "usage" in chunk and chunk["usage"] is None, chunk
        assert set(chunk["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}, chunk
        assert chunk["object"] == "chat.completion.chunk"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # without include_usage, OpenAI sends no usage at all
    plain = sse(gw, "/v1/chat/completions", {**body, "stream_options": None})
    assert plain and all("usage" not in e for e in plain) and all(e["choices"] for e in plain)
