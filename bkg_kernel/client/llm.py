"""The notebook side of llmserver: `wb.llm.chat(...)` streams into the cell output, `wb.llm.embed(...)` returns
a numpy array, `wb.models` renders as a table."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from bkg_kernel.client import transport
from bkg_kernel.display import Table, fmt_bytes

if TYPE_CHECKING:
    import numpy as np

    from bkg_kernel.client.workbench import Workbench


class Answer(str):
    """The text of an answer, with the raw response (`.response`) and token usage (`.usage`) attached."""

    response: dict[str, Any]
    usage: dict[str, int]


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
        """Ask the model; with `stream` the tokens appear in the output as they come. Returns the text."""
        if not stream:
            r = self.wb.call("POST", "/v1/chat/completions", json={"messages": _messages(messages), **opts})
            ans = Answer(r["choices"][0]["message"].get("content") or "")
            ans.response, ans.usage = r, r["usage"]
            if echo:
                print(ans)
            return ans
        parts: list[str] = []
        usage: dict[str, int] = {}
        body = {"messages": _messages(messages), **opts, "stream": True, "stream_options": {"include_usage": True}}
        for chunk in transport.stream(self.wb.http, "POST", "/v1/chat/completions", json=body):
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    parts.append(piece)
                    if echo:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
        if echo:
            sys.stdout.write("\n")
        ans = Answer("".join(parts))
        ans.response, ans.usage = {}, usage
        return ans

    def complete(self, prompt: str, **opts: Any) -> Answer:
        """Continue a prompt (no chat template)."""
        r = self.wb.call("POST", "/v1/completions", json={"prompt": prompt, **opts})
        ans = Answer(r["choices"][0]["text"])
        ans.response, ans.usage = r, r["usage"]
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


def _messages(m: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": m}] if isinstance(m, str) else m
