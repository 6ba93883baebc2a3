"""The notebook side of llmserver: `wb.llm.chat(...)` streams into the cell output (and is not shown a second time
as the cell's result), `wb.llm.embed(...)` returns a numpy array, `wb.models` renders as a table."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from bkg_kernel.client import transport
from bkg_kernel.display import ShownOnce, Table, fmt_bytes, markdown_html, running_cell

if TYPE_CHECKING:
    import numpy as np

    from bkg_kernel.client.workbench import Workbench


class Answer(ShownOnce, str):
    """The text of an answer, with the raw response (`.response`) and token usage (`.usage`) attached.

    In a notebook it renders as Markdown (with its text as the plain fallback, not a quoted repr), except in the
    cell that already printed it as it came (`chat`'s echo), where its first display shows nothing: a cell ending
    in `wb.llm.chat(...)` shows the answer once, and the answer is still the cell's value (`_`, `Out`)."""

    response: dict[str, Any]
    usage: dict[str, int]

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        # JupyterLab, VS Code and nbconvert show text/html before text/markdown: the model's raw HTML is text there
        return {"text/html": markdown_html(self), "text/markdown": str(self), "text/plain": str(self)}

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))  # IPython's text/plain: the text, not str's quoted repr


class LLM:
    """Chat, completion and embeddings through the gateway's OpenAI-compatible /v1 routes."""

    def __init__(self, wb: Workbench) -> None:
        self.wb = wb

    def __repr__(self) -> str:
        return f"LLM({self.wb.url}/v1)"

    def models(self) -> list[str]:
        """Return the model ids llmserver can serve."""
        return [m["id"] for m in self.wb.call("GET", "/v1/models")["data"]]

    def stream(self, messages: str | list[dict[str, Any]], **opts: Any) -> Iterator[str]:
        """Yield the answer's text pieces as the model writes them."""
        body = {"messages": _messages(messages), **opts, "stream": True}
        for chunk in transport.stream(self.wb.http, "POST", "/v1/chat/completions", json=body):
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece

    def chat(
        self, messages: str | list[dict[str, Any]], *, stream: bool = True, echo: bool = True, **opts: Any
    ) -> Answer:
        """Ask the model; with `stream` the tokens appear in the output as they come (with `echo` and no `stream`, the
        whole answer once it is there). Returns the text; an echoed answer is not shown again as its cell's result."""
        if not stream:
            r = self.wb.call("POST", "/v1/chat/completions", json={"messages": _messages(messages), **opts})
            ans = Answer(r["choices"][0]["message"].get("content") or "")
            ans.response, ans.usage = r, r["usage"]
            if echo:
                print(ans)
                ans.echoed_in = running_cell()
            return ans
        body = {"messages": _messages(messages), **opts, "stream": True, "stream_options": {"include_usage": True}}
        return self._streamed("/v1/chat/completions", body, echo)

    def complete(self, prompt: str, *, stream: bool = False, **opts: Any) -> Answer:
        """Continue a prompt (no chat template); with `stream` the text appears in the output as it comes."""
        if stream:
            body = {"prompt": prompt, **opts, "stream": True, "stream_options": {"include_usage": True}}
            return self._streamed("/v1/completions", body, True)
        r = self.wb.call("POST", "/v1/completions", json={"prompt": prompt, **opts})
        ans = Answer(r["choices"][0]["text"])
        ans.response, ans.usage = r, r["usage"]
        return ans

    def _streamed(self, path: str, body: dict[str, Any], echo: bool) -> Answer:
        """A streamed answer's text, printed as it comes with `echo`; its `.response` is assembled as the whole
        (not streamed) answer would hold it: tool calls, finish_reason, usage."""
        chat = path.endswith("/chat/completions")
        parts: list[str] = []
        head: dict[str, Any] = {}
        usage: dict[str, int] = {}
        finish: str | None = None
        calls: dict[int, dict[str, Any]] = {}
        for chunk in transport.stream(self.wb.http, "POST", path, json=body):
            head = head or {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
                delta = choice.get("delta") or {}
                piece = delta.get("content") if chat else choice.get("text")
                if piece:
                    parts.append(piece)
                    if echo:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                for call in delta.get("tool_calls") or []:
                    _add_call(calls, call)
        if echo:
            sys.stdout.write("\n")
        ans = Answer("".join(parts))
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": str(ans) if ans or not calls else None}
            if calls:
                message["tool_calls"] = [calls[i] for i in sorted(calls)]
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": str(ans), "finish_reason": finish, "logprobs": None}
        kind = "chat.completion" if chat else "text_completion"
        ans.response = {**head, "object": kind, "choices": [choice], "usage": usage}
        ans.usage = usage
        if echo:
            ans.echoed_in = running_cell()
        return ans

    def embed(self, texts: str | list[str], model: str | None = None) -> np.ndarray:
        """Embed texts; return an (n, dim) float32 array of normalized vectors."""
        import numpy as np

        body: dict[str, Any] = {"input": texts}
        if model:
            body["model"] = model
        data = self.wb.call("POST", "/v1/embeddings", json=body)["data"]
        return np.asarray([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)


class ModelTable(Table):
    """Registered models as a notebook table."""

    headers = ("id", "kind", "size", "license", "source", "sha256")
    caption = "bkg models"

    def cells(self, row: dict[str, Any]) -> Sequence[Any]:
        """Return one model's cells."""
        size = fmt_bytes(row["size"])  # a trained classifier of 6 KB read "0.0" in MB
        return (row["id"], row["kind"], size, row.get("license") or "", row["source"], row["sha256"][:12])


def _add_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """Add one streamed tool-call delta to the calls so far (by its `index`; name and arguments come in pieces)."""
    call = calls.setdefault(
        int(delta.get("index", len(calls))), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
    )
    call["id"] = delta.get("id") or call["id"]
    call["type"] = delta.get("type") or call["type"]
    fn = delta.get("function") or {}
    call["function"]["name"] += fn.get("name") or ""
    call["function"]["arguments"] += fn.get("arguments") or ""


def _messages(m: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": m}] if isinstance(m, str) else m
