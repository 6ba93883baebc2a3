"""llmserver's /v1 at its edges, through a real gateway with the real SmolLM2 GGUF: bodies nested past what pydantic
writes, a streamed completion's echo, and an upstream that answers 200 with something that is not OpenAI's answer
(a stand-in server on 127.0.0.1 plays the remote one: the boundary). An unhandled error's 500 closes its connection
cleanly (a real uvicorn with the gateway's error handlers)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, wait_for

from bkg_kernel.models.defaults import DEFAULT_LLM
from bkg_kernel.runtime.bodyjson import TOO_DEEP

MODEL = DEFAULT_LLM
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("llm-edges") / "data", plugins=["llmserver"])
    yield g
    g.stop()


def deep(levels: int) -> Any:
    """`{"a": {"a": ... 1}}`, `levels` objects deep (past pydantic's ~250 but under the JSON parser's limit)."""
    out: Any = 1
    for _ in range(levels):
        out = {"a": out}
    return out


def test_a_body_nested_too_deeply_is_openai_s_400_naming_the_body(gw: Gateway) -> None:
    big = "x" * 70_000  # over 64 KiB: dumped on a thread, the other way through
    bodies = [
        ("/v1/chat/completions", {"messages": [{**HI[0], "extra": deep(300)}], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}], "max_tokens": 1, "user": deep(300)}),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "stream": True, "stream_options": deep(300)}),
        (
            "/v1/chat/completions",
            {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"schema": deep(300)}}},
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "user": deep(300)}),
        ("/v1/embeddings", {"input": "hi", "user": deep(300)}),
        ("/v1/embeddings", {"input": [big], "user": deep(300)}),
    ]
    with gw.client() as c:
        for path, body in bodies:
            r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            err = r.json()["error"]
            assert r.status_code == 400, (path, r.text[:300])
            assert (err["type"], err["param"], err["message"]) == ("invalid_request_error", "body", TOO_DEEP)
        # the same connection serves the next request
        r = c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_v1_reads_types_as_openai_does(gw: Gateway) -> None:
    """Found by a new user's trial: `/v1` took `"max_tokens": true` as 1, `"5"` as 5, `"stream": "yes"` as a
    stream and `"dimensions": "3"` as 3 (pydantic's lax mode), where the rest of the gateway and OpenAI's API
    refuse them; now a 400 `invalid_request_error` naming the field. A whole number written 5.0 is still 5, an
    integer is a number, and fields bkg does not use (`user`, `n`) are still taken."""
    refused = [
        ("/v1/chat/completions", {"messages": HI, "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": "5"}, "max_tokens"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 1, "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "seed": True}, "seed"),
        ("/v1/embeddings", {"input": "hi", "dimensions": "3"}, "dimensions"),
    ]
    with gw.client() as c:
        for path, body, field in refused:
            r = c.post(path, json=body)
            assert r.status_code == 400, (body, r.text[:300])
            err = r.json()["error"]
            assert (err["type"], field) == ("invalid_request_error", err["param"].split(".")[-1]), err
        for path, body, field, meant in [
            ("/v1/chat/completions", {"messages": HI, "max_tokenz": 1}, "max_tokenz", "max_tokens"),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "temprature": 0}, "temprature", "temperature"),
            ("/v1/embeddings", {"input": "hi", "dimension": 3}, "dimension", "dimensions"),
        ]:  # a misspelt field was dropped without a word, and the call ran as if it had not been given
            r = c.post(path, json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == field and f"did you mean {meant!r}" in err["message"]
        r = c.post(
            "/v1/chat/completions",
            json={"messages": HI, "max_tokens": 2.0, "temperature": 0, "user": "u", "n": 1, "logprobs": False,
                  "top_logprobs": None, "stream_options": None, "parallel_tool_calls": True},
        )  # fmt: skip
        assert r.status_code == 200, r.text[:300]
        assert r.json()["usage"]["completion_tokens"] <= 2


def test_an_unknown_or_foreign_model_says_what_llmserver_runs(gw: Gateway) -> None:
    """Found by a new user's trial: embedding with the collection's own `candle:all-minilm-l6-v2` said "not
    registered (known: all-minilm-l6-v2, <classifiers>...)", and the "known" id then said llmserver runs GGUF
    models: the list named models llmserver cannot run, and nothing said where the candle one runs."""
    with gw.client() as c:
        r = c.post("/v1/embeddings", json={"input": "hi", "model": "candle:all-minilm-l6-v2"})
        assert r.status_code == 400 and "/api/embed" in r.json()["error"]["message"], r.text
        r = c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1, "model": "nope"})
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "model_not_found", r.text
        assert MODEL in err["message"] and "all-minilm-l6-v2" not in err["message"]  # GGUF models only


def test_a_streamed_completion_echoes_the_prompt_as_the_whole_one_does(gw: Gateway) -> None:
    body = {"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 4, "temperature": 0, "seed": 1, "echo": True}
    with gw.client() as c:
        whole = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        plain = c.post("/v1/completions", json={**body, "echo": False}).json()["choices"][0]["text"]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    texts = [ch["choices"][0]["text"] for ch in chunks if ch["choices"]]
    assert whole.startswith("1, 2, 3, 4,") and len(whole) > len("1, 2, 3, 4,")
    assert texts[0] == "1, 2, 3, 4," and "".join(texts) == whole
    assert whole == "1, 2, 3, 4," + plain


class Upstream(BaseHTTPRequestHandler):
    """A stand-in for a remote OpenAI-compatible server (the boundary: no real remote one here) that answers 200
    with what `mode` says, as a misbehaving proxy or server might."""

    mode: ClassVar[str] = "html"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        kind = self.path.rsplit("/", 1)[-1]  # chat/completions -> completions, completions, embeddings
        chat = self.path.endswith("chat/completions")
        ctype, out = "application/json", b""
        if self.mode == "html":
            ctype, out = "text/html", b"<html><body>proxy login</body></html>"
        elif self.mode == "list":
            out = b"[]"
        elif self.mode == "no choices":
            out = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": "m"}).encode()
        elif self.mode == "no usage":  # valid: `usage` is optional in OpenAI's schema
            answers: dict[str, Any] = {
                "completions": {
                    "id": "x", "created": 1, "model": "m",
                    "object": "chat.completion" if chat else "text_completion",
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}
                        if chat
                        else {"index": 0, "finish_reason": "stop", "text": "hi", "logprobs": None}
                    ],
                },
                "embeddings": {"object": "list", "model": "m", "data": [{"object": "embedding", "index": 0,
                                                                          "embedding": [0.6, 0.8]}]},
            }  # fmt: skip
            out = json.dumps(answers[kind]).encode()
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def upstream(gw: Gateway) -> Iterator[httpx.Client]:
    """The gateway's llmserver forwarding to the stand-in; its own settings back afterwards."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    c = gw.client()
    cfg = c.get("/api/plugins/llmserver/config").json()["config"]
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    c.put("/api/plugins/llmserver/config", json={"config": {**cfg, "upstream_url": url}}).raise_for_status()
    try:
        yield c
    finally:
        c.put("/api/plugins/llmserver/config", json={"config": cfg}).raise_for_status()
        server.shutdown()
        server.server_close()
        c.close()


def test_an_upstream_200_that_is_not_openai_s_answer_is_a_502(upstream: httpx.Client) -> None:
    c = upstream
    asks = [
        ("/v1/chat/completions", {"messages": HI}),
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
    ]
    for mode, said in [("html", "text/html"), ("list", "JSON list"), ("no choices", "choices: Field required")]:
        Upstream.mode = mode
        for path, body in asks:
            r = c.post(path, json=body)
            err = r.json()["error"]
            assert r.status_code == 502 and err["code"] == "upstream_error", (mode, path, r.text)
            assert "not an OpenAI answer" in err["message"] and err["type"] == "server_error", (mode, path, r.text)
            if path == "/v1/chat/completions":
                assert said in err["message"], r.text
        if mode != "no choices":  # a page or a list in place of the event stream: no silent empty stream
            r = c.post("/v1/chat/completions", json={"messages": HI, "stream": True})
            assert r.status_code == 502 and "not an OpenAI stream" in r.json()["error"]["message"], (mode, r.text)


def test_an_upstream_answer_without_usage_passes_with_zero_tokens(upstream: httpx.Client) -> None:
    Upstream.mode = "no usage"
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    r = upstream.post("/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hi" and r.json()["usage"] == zero
    r = upstream.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hi" and r.json()["usage"] == zero, r.text
    r = upstream.post("/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 200 and r.json()["data"][0]["embedding"] == [0.6, 0.8], r.text
    assert r.json()["usage"]["total_tokens"] == 0


def test_an_unhandled_500_closes_its_connection_before_the_next_request() -> None:
    """Starlette raises an unhandled error again after its 500 is sent, and uvicorn then drops the connection: a
    client that sent its next request down it got a reset. The 500 says `Connection: close` (a /v1 route's error
    handlers, on a real uvicorn; the route that fails stands in for a bug)."""
    import uvicorn
    from fastapi import FastAPI

    from bkg_kernel.gateway import errors

    app = FastAPI()
    errors.install(app)

    @app.post("/v1/broken")
    async def broken() -> None:
        raise RuntimeError("a bug")

    @app.get("/v1/fine")
    async def fine() -> dict[str, bool]:
        return {"ok": True}

    sock = socket.create_server(("127.0.0.1", 0))  # bound here: no port picked free that another may take
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=20)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
            for _ in range(20):
                r = c.post("/v1/broken")
                assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
                assert r.headers["connection"] == "close"
                assert c.get("/v1/fine").json() == {"ok": True}  # was: ReadError, connection reset by peer
    finally:
        server.should_exit = True
        thread.join(10)
