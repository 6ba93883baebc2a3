"""llmserver after a review, through a real gateway with the real SmolLM2 GGUF: what a stream its client leaves
generated is booked, embeddings read their whole input and stop when their client leaves, what the local model
cannot honour is a 400 naming it (a picture, logprobs, a schema keyword the grammar does not hold), `logit_bias`
acts, and the notebook client assembles a streamed answer as the whole one."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from gateway_harness import ADMIN_KEY, Gateway, configured, start_gateway, wait_for

from bkg_kernel.models.defaults import DEFAULT_LLM

MODEL = DEFAULT_LLM
HI = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # one thread: the timings below are the same on a busy machine with more cores
    g = start_gateway(tmp_path_factory.mktemp("llm-review") / "data", plugins=["llmserver"],
                      env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    yield g
    g.stop()


def health(gw: Gateway) -> dict[str, Any]:
    return dict(gw.client().get("/api/plugins/llmserver/health").json())


def test_a_stream_its_client_leaves_is_booked_with_the_tokens_generated(gw: Gateway) -> None:
    """Found by a review: usage was booked from a stream's last chunk only, which a generation its client left
    never sends: closing a stream early was free. The worker now tells the count as it goes, and the gateway books
    the last count it saw however the stream ends."""
    admin = gw.client()
    made = admin.post("/admin/keys", json={"name": "leaves-early", "scopes": ["llm:use"]}).json()
    # counting never reaches an end-of-text token: only max_tokens or the client's leaving ends it
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 300, "temperature": 0, "stream": True}
    got = 0
    with gw.client(made["key"]) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            got += '"text": "' in line and '"text": ""' not in line
            if got >= 20:
                break

    def mine() -> dict[str, Any] | None:
        rows = admin.get("/admin/usage", params={"group_by": "key"}).json()["usage"]
        return next((row for row in rows if row["key_id"] == made["id"]), None)

    row = wait_for(mine, timeout=20, every=0.25)
    assert row["requests"] == 1 and row["prompt_tokens"] > 0
    assert 20 <= row["completion_tokens"] < 300  # what was generated until it stopped, not the whole max_tokens


def test_embeddings_read_the_whole_input_and_refuse_one_past_the_context(gw: Gateway) -> None:
    """Found by a review: an embedding context evaluated `n_batch` tokens a batch (512) and llama-cpp-python cut
    every input there without a word (two texts that differ past it got the same vector) while usage counted them
    all. Each input is now embedded whole, and one past the context is a 400 naming it. (A small `n_batch` and
    `n_ctx` here: the same cut, a few seconds of embedding.)"""
    shared = " ".join(f"w{i}" for i in range(40))  # past 64 tokens
    with configured(gw, "llmserver", n_batch=64, n_ctx=256), gw.client() as c:
        tail = " and then apples, pears and plums from the orchard" * 5
        r = c.post("/v1/embeddings", json={"model": MODEL, "input": [shared, shared + tail]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 128
        v = np.array([d["embedding"] for d in r.json()["data"]])
        assert float(v[0] @ v[1]) < 0.99  # the ending counts
        r = c.post("/v1/embeddings", json={"model": MODEL, "input": ["short", "hello " * 300]})
        err = r.json()["error"]
        assert r.status_code == 400 and (err["param"], err["code"]) == ("input[1]", "context_length_exceeded")


def test_an_embedding_its_client_leaves_stops_and_frees_its_slot(gw: Gateway) -> None:
    """Found by a review: a `/v1/embeddings` call whose client gave up ran to its end, holding its slot (a minute
    for a big batch on one core). It is now given up as a chat is, and stops between two batches."""
    with configured(gw, "llmserver", n_batch=64), gw.client() as c:
        assert c.post("/v1/embeddings", json={"model": MODEL, "input": "warm"}).status_code == 200  # loaded first
        cancelled = health(gw)["cancelled"]
        texts = [f"text number {i} about apples" for i in range(400)]  # ~a minute of embedding on one core
        with (
            gw.client(timeout=1.5) as gone,
            pytest.raises(httpx.ReadTimeout),
        ):
            gone.post("/v1/embeddings", json={"model": MODEL, "input": texts})
        left = time.monotonic()

        def idle() -> bool:
            return all(m["busy"] == 0 for m in health(gw)["loaded"] if m["embedding"])

        wait_for(idle, timeout=10, every=0.25)
        assert time.monotonic() - left < 10 and health(gw)["cancelled"] > cancelled


def test_what_the_local_model_cannot_honour_is_a_400_naming_it(gw: Gateway) -> None:
    """Found by a review: a picture or a sound in a message was dropped (the model answered as if it had none),
    and `tool_choice` with no tools, `functions`, `logprobs`, `suffix`, `best_of` and audio `modalities` were
    ignored without a word."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    chat: list[tuple[dict[str, Any], str]] = [
        ({"messages": [{"role": "user", "content": [image]}]}, "messages[0].content[0]"),
        ({"messages": [HI[0], {"role": "user", "content": [{"type": "text", "text": "hi"}, audio]}]},
         "messages[1].content[1]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
    ]  # fmt: skip
    completion: list[tuple[dict[str, Any], str]] = [
        ({"suffix": " five, six"}, "suffix"),
        ({"logprobs": 0}, "logprobs"),
        ({"best_of": 3}, "best_of"),
    ]
    with gw.client() as c:
        for extra, field in chat:
            for stream in (False, True):
                body = {"model": MODEL, "messages": HI, "max_tokens": 2, "stream": stream, **extra}
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == field, (extra, r.text[:300])
        for extra, field in completion:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "One, two,", "max_tokens": 2, **extra})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (extra, r.text[:300])
        # what changes nothing still passes, as OpenAI's clients send it
        ok = {"logprobs": False, "top_logprobs": None, "modalities": ["text"], "tool_choice": "none", "n": 1}
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2, **ok})
        assert r.status_code == 200, r.text
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "One,", "max_tokens": 2, "suffix": ""})
        assert r.status_code == 200, r.text


def test_logit_bias_moves_the_tokens_it_names(gw: Gateway) -> None:
    """Found by a review: `logit_bias` was taken and ignored. A bias of 100 now all but forces its token; a token
    the model does not have, or a key that is no token id, is a 400 naming it."""
    body = {"model": MODEL, "prompt": "One, two, three,", "max_tokens": 4, "temperature": 0}
    with gw.client() as c:
        plain = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        r = c.post("/v1/completions", json={**body, "logit_bias": {"330": 100}})
        text = r.json()["choices"][0]["text"]
        piece = text[: len(text) // 4]
        assert text != plain and piece and text == piece * 4, (plain, text)  # one token, four times
        r = c.post("/v1/completions", json={**body, "logit_bias": {"999999": -100}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias.999999", r.text
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "logit_bias": {"a": 5}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "logit_bias": {"5": 101}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


def test_schema_keywords_the_grammar_does_not_hold_are_refused_where_they_are(gw: Gateway) -> None:
    """Found by a review: llama-cpp-python's schema-to-grammar converter skips `minimum`, `maximum`, `multipleOf`,
    `uniqueItems`, unknown formats and more, and answers broke them with finish_reason "stop". Such a schema is now
    a 400 naming the keyword's place; one the grammar holds is still answered."""
    at = "response_format.json_schema.schema"
    refused = [
        ({"type": "number", "minimum": 1, "maximum": 5}, f"{at}.minimum"),  # a number's range: not held
        ({"type": "integer", "minimum": 0, "maximum": 5000}, f"{at}.minimum"),  # more than 1,000 values
        ({"type": "object", "properties": {"n": {"type": "integer", "maximum": 20}}}, f"{at}.properties.n.maximum"),
        ({"type": "number", "exclusiveMinimum": 0}, f"{at}.exclusiveMinimum"),
        ({"type": "integer", "multipleOf": 3}, f"{at}.multipleOf"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, f"{at}.uniqueItems"),
        ({"type": "array", "items": {"type": "string", "format": "email"}}, f"{at}.items.format"),
        ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, f"{at}.maxLength"),
        ({"$defs": {"x": {"not": {"type": "null"}}}, "$ref": "#/$defs/x"}, f"{at}.$defs.x.not"),
        ({"type": "object", "minProperties": 1}, f"{at}.minProperties"),
    ]
    with gw.client() as c:
        for schema, field in refused:
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 4,
                                                     "response_format": fmt})  # fmt: skip
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (schema, r.text[:300])
        # a forced tool's parameters are a grammar too: named where they are
        tool = {"type": "function", "function": {"name": "pick", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}  # fmt: skip
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 4,
                                                 "tools": [WEATHER, tool], "tool_choice": "required"})  # fmt: skip
        assert r.json()["error"]["param"] == "tools[1].function.parameters.properties.n.minimum", r.text
        for schema in ({"type": "string", "format": "date-time"}, {"type": "string", "pattern": "^[A-Z]{3}$"}):
            fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 4,
                                                     "temperature": 0, "response_format": fmt})  # fmt: skip
            assert r.status_code == 200, r.text


def test_a_tool_schema_llama_cpp_cannot_use_is_blamed_on_that_tool(gw: Gateway) -> None:
    """Found by a review: a forced tool whose parameters made no grammar was a 400 naming `response_format`, a
    field the request did not have."""
    broken = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}}}  # fmt: skip
    with gw.client() as c:
        choice = {"type": "function", "function": {"name": "f"}}
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2,
                                                 "tools": [WEATHER, broken], "tool_choice": choice})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools[1].function.parameters", r.text


def test_the_notebook_client_assembles_a_streamed_answer_as_the_whole_one(gw: Gateway) -> None:
    """Found by a review: `wb.llm.chat(...)` streamed (its default) lost the tool calls and the finish reason
    (`.response` was `{}`), and `wb.llm.complete(prompt, stream=True)` failed with a TypeError."""
    from bkg_kernel.client import Workbench

    wb = Workbench(gw.url, ADMIN_KEY)
    ask = "What is the weather in Paris?"
    kw: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 60, "temperature": 0, "seed": 1}
    with contextlib.redirect_stdout(io.StringIO()):
        streamed = wb.llm.chat(ask, **kw)
        whole = wb.llm.chat(ask, stream=False, **kw)
    got, want = streamed.response["choices"][0], whole.response["choices"][0]
    assert got["finish_reason"] == want["finish_reason"] == "tool_calls"
    assert [c["function"] for c in got["message"]["tool_calls"]] == [
        c["function"] for c in want["message"]["tool_calls"]
    ]
    assert got["message"]["content"] is None and got["message"]["tool_calls"][0]["id"].startswith("call_")
    assert streamed.response["usage"] == streamed.usage == whole.usage and streamed.response["model"] == MODEL
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        text = wb.llm.chat("Name three colours.", max_tokens=5, temperature=0)
    assert text.response["choices"][0]["message"]["content"] == str(text)
    assert text.response["choices"][0]["finish_reason"] == "length" and text.usage["completion_tokens"] == 5
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        more = wb.llm.complete("One, two, three,", stream=True, max_tokens=4, temperature=0)
    plain = wb.llm.complete("One, two, three,", max_tokens=4, temperature=0)
    assert str(more) == str(plain) and printed.getvalue() == f"{more}\n"
    assert more.usage == plain.usage and more.response["choices"][0]["finish_reason"] == "length"


def test_with_tools_a_plain_answer_streams_as_it_is_made(gw: Gateway) -> None:
    """Found by a review: with `tools` given, an answer in plain text came as one chunk at the end (held back in
    case it was a tool call). It is held only while it may still be one: once it cannot, it streams."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello to Ann in one sentence."}],
            "tools": [WEATHER], "max_tokens": 16, "temperature": 0, "seed": 1}  # fmt: skip
    with gw.client() as c:
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert whole["message"].get("tool_calls") is None and whole["message"]["content"], whole  # plain text
        parts: list[str] = []
        finish = None
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    if choice["delta"].get("content"):
                        parts.append(choice["delta"]["content"])
                    finish = choice["finish_reason"] or finish
    assert len(parts) >= 5, parts  # token by token (one held-back chunk at the end before)
    assert "".join(parts) == whole["message"]["content"] and finish == whole["finish_reason"]


@pytest.mark.parametrize(
    ("start", "may"),
    [("", True), ("  ", True), ("{", True), (' {"name"', True), ("<tool", True), ("<tool_call>", True),
     ("<tool_call>\n{", True), ("Hello", False), ("<b>", False), ("<tool_call>Hi", False), ("[1]", False)],
)  # fmt: skip
def test_what_may_still_be_a_tool_call(start: str, may: bool) -> None:
    from bkg_kernel.plugins.llmserver.generate import may_be_tool_call

    assert may_be_tool_call(start) is may


def test_an_integer_range_is_held_by_the_grammar(gw: Gateway) -> None:
    """A rating's `{"type": "integer", "minimum": 1, "maximum": 5}` was refused (the converter skips both ends); it
    is held as the list of its values, in a response format and in a forced tool's arguments alike, and the answer
    keeps to it even when asked for a number outside it."""
    stars = {"type": "integer", "minimum": 1, "exclusiveMaximum": 6, "description": "1 to 5"}
    schema = {"type": "object", "properties": {"stars": stars}, "required": ["stars"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Reply in JSON with stars set to 42."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "rating", "schema": schema}}
    tool = {"type": "function", "function": {"name": "rate", "parameters": schema}}
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ask, "max_tokens": 20, "temperature": 0,
                                                 "response_format": fmt})  # fmt: skip
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["choices"][0]["message"]["content"])["stars"] in range(1, 6), r.text
        r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": ask, "max_tokens": 30, "temperature": 0,
                                                 "tools": [tool], "tool_choice": "required"})  # fmt: skip
        assert r.status_code == 200, r.text
        call = r.json()["choices"][0]["message"]["tool_calls"][0]["function"]
        assert call["name"] == "rate" and json.loads(call["arguments"])["stars"] in range(1, 6), r.text
        even = {"type": "integer", "minimum": 0, "maximum": 9, "multipleOf": 2}
        fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": even}}
        for seed in (1, 2, 3):
            body = {"model": MODEL, "messages": ask, "max_tokens": 4, "temperature": 1.5, "seed": seed}
            r = c.post("/v1/chat/completions", json={**body, "response_format": fmt})
            assert r.status_code == 200 and json.loads(r.json()["choices"][0]["message"]["content"]) in (0, 2, 4, 6, 8)


def test_held_ranges_rewrites_only_what_it_can_hold() -> None:
    from bkg_kernel.plugins.llmserver.generate import held_ranges

    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 2.5, "maximum": 5},
              "b": {"type": "integer", "minimum": 1}, "c": {"type": "number", "minimum": 0, "maximum": 1},
              "d": {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0, "maximum": 3}}}}  # fmt: skip
    held = held_ranges(schema)
    assert held["properties"]["a"] == {"enum": [3, 4, 5]}
    assert held["properties"]["b"] == schema["properties"]["b"] and held["properties"]["c"] == schema["properties"]["c"]
    assert held["properties"]["d"]["items"] == {"enum": [1, 2, 3]}
    assert schema["properties"]["a"]["minimum"] == 2.5  # the caller's schema is left as it was


def test_held_ranges_count_against_a_schemas_choices() -> None:
    from bkg_kernel.errors import InvalidInput
    from bkg_kernel.plugins.llmserver.generate import MAX_CHOICES, _checked, held_ranges

    many = {"type": "object", "properties": {f"p{i}": {"type": "integer", "minimum": 0, "maximum": 999}
                                             for i in range(MAX_CHOICES // 1000 + 1)}}  # fmt: skip
    with pytest.raises(InvalidInput, match="values in all") as got:
        _checked(held_ranges(many), "response_format.json_schema.schema")
    assert got.value.field.startswith("response_format.json_schema.schema.properties.p")
    _checked(held_ranges({"type": "object", "properties": dict(list(many["properties"].items())[:3])}), "x")
