"""llmserver: a real local LLM (llama.cpp through llama-cpp-python) behind OpenAI-shaped capabilities.

Runs in a worker process. Several GGUF models can be loaded at once (memory budget, parallel slots, idle
unload); or, with `upstream_url`, every request goes to another OpenAI-compatible server instead.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from fastapi import APIRouter

from bkg_kernel.client.transport import iter_sse
from bkg_kernel.errors import (
    BadRequest,
    BkgError,
    Cancelled,
    ContextTooLong,
    InvalidInput,
    NotFound,
    TooManyRequests,
    UpstreamError,
    invalid_from_pydantic,
)
from bkg_kernel.models.defaults import DEFAULT_LLM
from bkg_kernel.models.registry import ModelRegistry
from bkg_kernel.plugins.llmserver import generate as gen
from bkg_kernel.plugins.llmserver.pool import GGUF_KINDS, ModelPool
from bkg_kernel.plugins.llmserver.schemas import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    Embeddings,
    EmbedRequest,
    ModelList,
    ModelRef,
    Usage,
)
from bkg_kernel.runtime import calls
from bkg_kernel.runtime.contract import RUNNING_USAGE, GatewayAPI, Plugin, PluginSettings, capability

Answer = TypeVar("Answer", bound=BaseModel)  # an upstream's answer, read as one of OpenAI's

_CREDENTIAL = re.compile(r"key|token|secret|passw|pwd|sig|auth|credential", re.IGNORECASE)  # query names


class LLMSettings(PluginSettings):
    """llmserver settings (the lab panel's config form)."""

    max_concurrent: int = Field(2, ge=1, le=64, description="Parallel slots per model; more requests queue.")
    request_timeout: float = Field(
        300.0, gt=0, le=3600, description="Seconds a request (or a gap in a stream) may take."
    )
    default_model: str = Field(DEFAULT_LLM, description="Model used when a request names none.")
    embedding_model: str | None = Field(
        None, description="Model for embeddings; default: the first gguf-embedding model, else the default model."
    )
    n_ctx: int = Field(2048, ge=128, le=131_072, description="Context length per slot (capped at the model's).")
    n_threads: int | None = Field(None, ge=1, le=256, description="Threads (default: OMP_NUM_THREADS or all cores).")
    n_batch: int = Field(512, ge=8, le=8192, description="Prompt tokens evaluated per batch.")
    memory_budget_mb: int = Field(4096, ge=64, description="Loaded models (weights + KV caches) stay under this.")
    keep_alive: float = Field(300.0, ge=-1, description="Seconds an idle model stays loaded; -1 forever, 0 unload.")
    max_tokens_default: int = Field(512, ge=1, le=32_768, description="Completion limit when a request sets none.")
    max_tokens_limit: int | None = Field(
        None,
        ge=1,
        le=32_768,
        description="The most tokens one request may generate, whatever it asks (like llama-server's --n-predict): "
        "a request asking more stops there with finish_reason 'length'. Default: no limit but the context.",
    )
    max_prompt_chars: int = Field(200_000, ge=1, description="Longer prompts are refused before tokenizing.")
    templates: dict[str, str] = Field(default_factory=dict, description="Named Jinja chat templates.")
    model_templates: dict[str, str] = Field(
        default_factory=dict, description="Model id -> template name, overriding the template in the GGUF."
    )
    upstream_url: str | None = Field(
        None, description="An OpenAI-compatible base URL (vLLM, llama.cpp server, ...) to send every request to."
    )
    upstream_api_key: str | None = Field(
        None,
        description="Bearer key for the upstream server (never shown back).",
        json_schema_extra={"writeOnly": True},
    )

    secret_fields: ClassVar[tuple[str, ...]] = ("upstream_api_key",)
    # the worker reads the other two limits itself (llama.cpp contexts per model for max_concurrent, the timeout of
    # a call upstream for request_timeout): a change of them restarts it
    live_fields: ClassVar[tuple[str, ...]] = ("max_queue", "memory_limit_mb")

    @field_validator("upstream_url")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        """A password or key in the URL (`user:pw@`, `?api-key=`) would be shown to every `plugins:read` caller and
        written to the audit log with the rest of the settings: it belongs in `upstream_api_key`, which is not."""
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.username is not None or parts.password is not None:
            raise ValueError("the URL holds a user name or password: put the credential in upstream_api_key")
        secret = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _CREDENTIAL.search(k)]
        if secret:
            raise ValueError(f"the URL's query holds a credential ({', '.join(secret)}): put it in upstream_api_key")
        return v


class Empty(BaseModel):
    """No input."""


class LLMServer(Plugin):
    """Chat, completion and embeddings from local GGUF models (or an OpenAI-compatible upstream)."""

    id = "llmserver"
    name = "LLM server"
    version = "0.1.0"
    description = "Local LLM (llama.cpp): chat, completions, embeddings, streaming; OpenAI-compatible at /v1."
    mode = "worker"
    Settings = LLMSettings
    settings: LLMSettings

    @classmethod
    def routes(cls, api: GatewayAPI) -> APIRouter:
        """Mount the plugin's own HTTP routes on the gateway."""
        from bkg_kernel.plugins.llmserver import openai_routes

        return openai_routes.build(api)

    def start(self) -> None:
        assert self.context is not None and self.context.model_dir is not None
        self.registry = ModelRegistry(self.context.model_dir)
        self.pool = ModelPool(self.registry, self.settings)
        self.cancelled = 0  # generations stopped early because their client went away
        if self.settings.upstream_url is None:
            import llama_cpp  # fail the start now, with the reason, if the llm extra is missing

            self.log.info("llama-cpp-python %s; models in %s", llama_cpp.__version__, self.registry.dir)
        else:
            self.log.info("forwarding every request to %s", _no_userinfo(self.settings.upstream_url))

    def stop(self) -> None:
        self.pool.close()

    def health(self) -> dict[str, Any]:
        return {"ok": True, "loaded": list(self.pool.snapshot()[0].values()), "cancelled": self.cancelled}

    # -- capabilities -----------------------------------------------------------------------------
    @capability("llm.chat", scope="llm:use", books_usage=True, big_input=True)
    def chat(self, inp: ChatRequest) -> ChatCompletion:
        """Answer a conversation (OpenAI chat.completion)."""
        if self.settings.upstream_url:
            return self._upstream("chat/completions", inp, ChatCompletion)
        chunks = list(self._chat_stream(inp, calls.stop_event(), whole=True))  # its caller gone: it stops
        return ChatCompletion.model_validate(_whole(chunks))

    @capability("llm.complete", scope="llm:use", books_usage=True, big_input=True)
    def complete(self, inp: CompletionRequest) -> Completion:
        """Continue a prompt (OpenAI text_completion)."""
        if self.settings.upstream_url:
            return self._upstream("completions", inp, Completion)
        chunks = list(self._complete_stream(inp, calls.stop_event(), whole=True))
        return Completion.model_validate(_whole(chunks))

    @capability("llm.embed", scope="llm:use", books_usage=True, big_input=True)
    def embed(self, inp: EmbedRequest) -> Embeddings:
        """Embed one text or a batch (normalized vectors, OpenAI embedding list)."""
        if self.settings.upstream_url:
            return self._upstream("embeddings", inp, Embeddings)
        texts = inp.texts()
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:  # llama.cpp cannot embed zero tokens
            field = "input" if isinstance(inp.input, str) else f"input[{empty}]"
            raise BadRequest("an input to embed is empty: send at least one character", field=field)
        too_long = sum(len(t) for t in texts)
        if too_long > self.settings.max_prompt_chars * 10:
            raise InvalidInput(f"input is {too_long:,} characters in all; too much for one request", field="input")
        model_id = inp.model or self._embedding_model()
        stop = calls.stop_event()
        with self.pool.acquire(model_id, embedding=True) as (m, llm):
            counts = [len(llm.tokenize(t.encode("utf-8"), add_bos=True, special=False)) for t in texts]
            over = next((i for i, n in enumerate(counts) if n > m.n_ctx), None)
            if over is not None:  # embedded whole or not at all: a vector of its first part would pass for its own
                field = "input" if isinstance(inp.input, str) else f"input[{over}]"
                raise ContextTooLong(f"{field} is {counts[over]:,} tokens; model {model_id!r} embeds up to "
                                     f"{m.n_ctx:,} (n_ctx)", field=field)  # fmt: skip
            rows: list[Any] = []
            for start, end in _batches(counts, self.settings.n_batch):  # a caller gone stops it between two batches
                if stop.is_set():  # nobody reads the answer: what was embedded, for the caller's books
                    self.cancelled += 1
                    self.log.info("embedding cancelled after %d of %d texts (the client went away)", start, len(texts))
                    done = sum(counts[:start])
                    return Embeddings(data=[], model=model_id, usage=Usage(prompt_tokens=done, total_tokens=done))
                rows.extend(llm.embed(texts[start:end], normalize=True, truncate=False))
            vecs = np.asarray(rows, dtype=np.float32).reshape(len(texts), -1)
        if inp.dimensions is not None:
            if inp.dimensions > vecs.shape[1]:
                raise InvalidInput(f"dimensions {inp.dimensions} > the model's {vecs.shape[1]}", field="dimensions")
            vecs = vecs[:, : inp.dimensions]
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if inp.encoding_format == "base64"
                else v.tolist(),
            }
            for i, v in enumerate(vecs)
        ]
        n = sum(counts)
        return Embeddings(data=data, model=model_id, usage=Usage(prompt_tokens=n, total_tokens=n))

    @capability("llm.models", scope="llm:use", quick=True)  # answers while every slot generates (Ollama's tags)
    def models(self, inp: Empty) -> ModelList:
        """List the GGUF models that can be used, and which are loaded."""
        loaded, used_bytes = self.pool.snapshot()
        out = []
        for e in self.registry.list():
            if e.kind not in GGUF_KINDS:
                continue
            out.append(
                {
                    "id": e.id,
                    "kind": e.kind,
                    "size": e.size,
                    "created": calendar.timegm(time.strptime(e.added, "%Y-%m-%dT%H:%M:%SZ")),  # a UTC time
                    "loaded": [v for (mid, _), v in loaded.items() if mid == e.id],
                    "default": e.id == self.settings.default_model,
                }
            )
        used = used_bytes / 2**20
        return ModelList(models=out, memory_budget_mb=self.settings.memory_budget_mb, memory_used_mb=round(used, 1))

    @capability("llm.load", scope="models:write")
    def load(self, inp: ModelRef) -> ModelList:
        """Load a model now (or change how long it stays loaded when idle)."""
        self.pool.load(inp.model or self.settings.default_model, embedding=inp.embedding, keep_alive=inp.keep_alive)
        return self.models(Empty())

    @capability("llm.unload", scope="models:write")
    def unload(self, inp: ModelRef) -> ModelList:
        """Unload a model (its busy slots close when their requests end)."""
        model_id = inp.model or self.settings.default_model
        if not self.pool.unload(model_id):
            raise NotFound(f"model {model_id!r} is not loaded", field="model")
        return self.models(Empty())

    # -- streaming --------------------------------------------------------------------------------
    def stream(self, capability_id: str, data: Any, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        """Stream llm.chat / llm.complete as OpenAI chunks; the last chunk carries the exact usage, and each chunk
        of a local generation the usage so far (`RUNNING_USAGE`, which the gateway books if the stream ends early
        and strips before sending), so that a stream its client leaves is still booked."""
        models: dict[str, type[BaseModel]] = {"llm.chat": ChatRequest, "llm.complete": CompletionRequest}
        if capability_id not in models:
            raise NotFound(f"llmserver cannot stream {capability_id!r}", field="capability")
        try:
            inp: Any = models[capability_id].model_validate(data if data is not None else {})
        except ValidationError as exc:
            raise invalid_from_pydantic(exc, "input") from None
        if self.settings.upstream_url:
            path = "chat/completions" if capability_id == "llm.chat" else "completions"
            yield from self._upstream_stream(path, inp, cancelled)
        elif capability_id == "llm.chat":
            yield from self._chat_stream(inp, cancelled, whole=False)
        else:
            yield from self._complete_stream(inp, cancelled, whole=False)

    def _check_prompt(self, n: int, field: str) -> None:
        if n > self.settings.max_prompt_chars:
            raise InvalidInput(
                f"the prompt is {n:,} characters; the limit is {self.settings.max_prompt_chars:,} (max_prompt_chars)",
                field=field,
            )

    def _chat_stream(self, inp: ChatRequest, cancelled: threading.Event, *, whole: bool) -> Iterator[dict[str, Any]]:
        self._check_prompt(sum(len(m.text()) for m in inp.messages), "messages")
        model_id = inp.model or self.settings.default_model
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id}
        gen.refuse_unsupported(inp, model_id)
        tools = bool(gen.active_tools(inp))
        grammar, grammar_field = gen.grammar_for(inp)
        with self.pool.acquire(model_id) as (m, llm):
            s = self.settings
            prompt = gen.chat_prompt(m, inp, s.templates, s.model_templates)
            g = gen.Generation(
                llm, m, prompt, inp, cancelled, grammar=grammar, grammar_field=grammar_field,
                logit_bias=inp.logit_bias, default_max_tokens=s.max_tokens_default,
                max_tokens_limit=s.max_tokens_limit,
            )  # fmt: skip
            with self._counting_cancels(g):
                if not whole:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield {**head, "choices": [{**first, "finish_reason": None}]}
                # With tools, the text is held back while it may still be a tool call (sent whole, once parsed);
                # as soon as it cannot be one, what was held goes out and the rest streams, as Ollama does.
                plain, held = not tools, ""
                for delta in g.run():
                    if whole:
                        continue
                    if delta and not plain:
                        held += delta
                        if not gen.may_be_tool_call(held):
                            plain, delta, held = True, held, ""
                    if delta and plain:
                        choice = {"index": 0, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}
                        yield {**head, "choices": [choice], RUNNING_USAGE: g.usage()}
                    else:
                        yield {RUNNING_USAGE: g.usage()}  # nothing to send yet; the count all the same
        cut = g.finish_reason == "cancelled"  # whole: nobody reads the answer, but what was generated is booked
        if cut and not whole:  # the count of what was generated, for whoever still reads (the gateway books its last)
            yield {**head, "choices": [], "usage": g.usage()}
            return
        calls = gen.tool_calls_from(g.text, inp) if tools and not cut and (whole or not plain) else None
        finish = "tool_calls" if calls else g.finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": None if calls else g.text}
        if calls:
            message["tool_calls"] = calls
        if whole:
            yield {
                "id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": g.usage(),
            }  # fmt: skip
            return
        last: dict[str, Any] = {}
        if calls:
            last["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
        elif not plain and g.text:  # held to the end (it looked like a tool call), and was not one
            last["content"] = g.text
        yield {**head, "choices": [{"index": 0, "delta": last, "logprobs": None, "finish_reason": finish}]}
        yield {**head, "choices": [], "usage": g.usage()}

    def _complete_stream(
        self, inp: CompletionRequest, cancelled: threading.Event, *, whole: bool
    ) -> Iterator[dict[str, Any]]:
        text = inp.text()
        if not text:
            raise BadRequest("prompt is empty: send the text to continue", field="prompt")
        self._check_prompt(len(text), "prompt")
        model_id = inp.model or self.settings.default_model
        gen.refuse_unsupported(inp, model_id)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_id}
        with self.pool.acquire(model_id) as (m, llm):
            s = self.settings
            g = gen.Generation(
                llm, m, text, inp, cancelled, logit_bias=inp.logit_bias, default_max_tokens=s.max_tokens_default,
                max_tokens_limit=s.max_tokens_limit, add_bos=True,
            )  # fmt: skip
            with self._counting_cancels(g):
                if not whole and inp.echo:  # the prompt first, as the whole answer's text begins with it
                    yield {**head, "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}]}
                for delta in g.run():
                    if whole:
                        continue
                    if delta:
                        choice = {"index": 0, "text": delta, "finish_reason": None, "logprobs": None}
                        yield {**head, "choices": [choice], RUNNING_USAGE: g.usage()}
                    else:
                        yield {RUNNING_USAGE: g.usage()}
        if g.finish_reason == "cancelled" and not whole:  # whole, it is answered for the caller's books
            yield {**head, "choices": [], "usage": g.usage()}
            return
        out = (text if inp.echo else "") + g.text
        if whole:
            choice = {"index": 0, "text": out, "finish_reason": g.finish_reason, "logprobs": None}
            yield {**head, "choices": [choice], "usage": g.usage()}
            return
        yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": g.finish_reason, "logprobs": None}]}
        yield {**head, "choices": [], "usage": g.usage()}

    @contextlib.contextmanager
    def _counting_cancels(self, g: gen.Generation) -> Iterator[None]:
        """Count a generation that stopped early: cancelled between tokens, or closed while it waited to send."""
        ended = False
        try:
            yield
            ended = g.finish_reason != "cancelled"
        finally:
            if not ended:
                self.cancelled += 1
                self.log.info("generation cancelled after %d tokens (the client went away)", g.completion_tokens)

    def _embedding_model(self) -> str:
        if self.settings.embedding_model:
            return self.settings.embedding_model
        for e in self.registry.list("gguf-embedding"):
            return e.id
        return self.settings.default_model

    # -- upstream ---------------------------------------------------------------------------------
    def _upstream_request(self, path: str, inp: BaseModel, stream: bool) -> tuple[str, dict[str, Any], dict[str, str]]:
        assert self.settings.upstream_url is not None
        url = self.settings.upstream_url.rstrip("/") + "/" + path
        body = inp.model_dump(exclude_none=True, exclude_unset=True)
        body.pop("template", None)
        cap = self.settings.max_tokens_limit
        if cap is not None and "max_tokens" in type(inp).model_fields:  # the limit holds upstream too
            for key in ("max_tokens", "max_completion_tokens"):
                if key in body:
                    body[key] = min(body[key], cap)
            if "max_tokens" not in body and "max_completion_tokens" not in body:
                body["max_tokens"] = cap
        body["stream"] = stream
        if stream:
            body["stream_options"] = {"include_usage": True}
        headers = (
            {"Authorization": f"Bearer {self.settings.upstream_api_key}"} if self.settings.upstream_api_key else {}
        )
        return url, body, headers

    def _upstream(self, path: str, inp: BaseModel, answer: type[Answer]) -> Answer:
        """`inp` sent to the upstream's `path`, its answer read as `answer`: one that is not JSON (a proxy's login
        page) or not that OpenAI answer is the upstream's fault, a 502 like its failures."""
        import httpx

        url, body, headers = self._upstream_request(path, inp, False)
        if path == "embeddings":
            body.pop("stream", None)
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=self.settings.request_timeout)
        except httpx.HTTPError as exc:
            raise _upstream_error(url, f"{type(exc).__name__}: {exc}") from None
        if r.status_code >= 400:
            raise _upstream_error(url, r.text[:300], r.status_code, r.headers.get("retry-after"))
        try:
            data = r.json()
        except ValueError:
            kind = r.headers.get("content-type", "no content type")
            raise _upstream_error(url, f"not an OpenAI answer: {kind}, {r.text[:100]!r}") from None
        if not isinstance(data, dict):
            raise _upstream_error(url, f"not an OpenAI answer: JSON {type(data).__name__}, not an object")
        if data.get("usage") is None:  # optional in OpenAI's schema; bkg's callers (and their books) read it
            data["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        try:
            return answer.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ())) or "the answer"
            raise _upstream_error(url, f"not an OpenAI answer: {where}: {err.get('msg')}") from None

    def _upstream_stream(self, path: str, inp: BaseModel, cancelled: threading.Event) -> Iterator[dict[str, Any]]:
        import httpx

        url, body, headers = self._upstream_request(path, inp, True)
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=self.settings.request_timeout) as r:
                if r.status_code >= 400:
                    said = r.read()[:300].decode(errors="replace")
                    raise _upstream_error(url, said, r.status_code, r.headers.get("retry-after"))
                events = 0
                for event in iter_sse(r.iter_lines()):
                    if cancelled.is_set():
                        return
                    events += 1
                    yield event
                if not events:  # a proxy's page in place of the stream: a 502 before the caller's stream begins
                    kind = r.headers.get("content-type", "no content type")
                    raise _upstream_error(url, f"not an OpenAI stream: {kind}, no events")
        except (httpx.HTTPError, ValueError) as exc:  # a broken event is the upstream's fault too
            raise _upstream_error(url, f"{type(exc).__name__}: {exc}") from None


log = logging.getLogger("bkg.plugin.llmserver")  # the plugin's own log (its panel shows it)


def _no_userinfo(url: str) -> str:
    """`url` without a user or password in it: the log is shown in the plugin's panel."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _upstream_error(url: str, detail: str, status: int = 502, retry_after: str | None = None) -> BkgError:
    """What the caller is told of an upstream failure (its URL, an operator's setting, goes to the log only): a
    request the upstream refused is the caller's 4xx with the upstream's words; its rate limit is a 429 with its
    Retry-After; bkg's own credentials refused (401, 403, 407) or anything else is a 502, the server's fault."""
    log.warning("the upstream LLM server at %s answered %s: %s", _no_userinfo(url), status, detail)
    if status == 429:
        wait = float(retry_after) if retry_after and retry_after.isdigit() else 1.0
        return TooManyRequests("the upstream LLM server is rate limiting requests: try again later", retry_after=wait)
    if status in (401, 403, 407):
        return UpstreamError(f"the upstream LLM server refused llmserver's credentials (HTTP {status}): an operator "
                             "should check llmserver's upstream_api_key", status=502)  # fmt: skip
    if 400 <= status < 500:
        return UpstreamError(f"the upstream LLM server refused the request (HTTP {status}): {detail}", status=status)
    where = f"HTTP {status}: " if status != 502 else ""
    return UpstreamError(f"the upstream LLM server failed: {where}{detail}", status=502)


def _batches(counts: list[int], size: int) -> Iterator[tuple[int, int]]:
    """Consecutive runs of texts (start, end) whose tokens (`counts`) add up to at most `size` each."""
    start, total = 0, 0
    for i, n in enumerate(counts):
        if i > start and total + n > size:
            yield start, i
            start, total = i, 0
        total += n
    yield start, len(counts)


def _whole(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole answer's one chunk (finish_reason "cancelled" when nobody waited for it any more: its usage is still
    booked to the caller)."""
    if not chunks:
        raise Cancelled("the generation stopped: its caller went away or timed out")
    return chunks[-1]
