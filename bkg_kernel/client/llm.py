"""The notebook side of llmserver: `wb.llm.chat(...)` streams into the cell output, `wb.llm.embed(...)` returns
a numpy array, `wb.models` renders as a table; `%load_ext bkg_kernel` adds the `%%chat` cell magic."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from bkg_kernel.store.results import html_table

if TYPE_CHECKING:
    import numpy as np

    from bkg_kernel.client import Workbench


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
        for chunk in self._sse("/v1/chat/completions", body):
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
        for chunk in self._sse("/v1/chat/completions", body):
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

    def _sse(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import httpx

        from bkg_kernel.client import raise_for_error
        from bkg_kernel.errors import BkgError, Unavailable

        try:
            with self.wb.http.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise_for_error(r)
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        err = BkgError(chunk["error"].get("message", "stream failed"))
                        err.status = int(chunk["error"].get("status", 500))
                        raise err
                    yield chunk
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach the bkg gateway at {self.wb.url}: {exc}") from None


class ModelTable(list[dict[str, Any]]):
    """Registered models as a notebook table."""

    def _repr_html_(self) -> str:
        rows = [
            (m["id"], m["kind"], f"{m['size'] / 2**20:,.1f}", m.get("license") or "", m["source"], m["sha256"][:12])
            for m in self
        ]
        return html_table(["id", "kind", "MB", "license", "source", "sha256"], rows, "bkg models")


def chat_magic(line: str, cell: str) -> None:
    """`%%chat [--model ID] [--max-tokens N] [--temperature T]`: send the cell to the LLM, stream the answer."""
    import argparse
    import shlex

    from bkg_kernel.client import connect

    p = argparse.ArgumentParser(prog="%%chat", add_help=False)
    p.add_argument("--model")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--system")
    args = p.parse_args(shlex.split(line))
    opts = {
        k: v
        for k, v in {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature}.items()
        if v is not None
    }
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": cell.strip()}
    ]
    connect().llm.chat(messages, **opts)


def _messages(m: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": m}] if isinstance(m, str) else m
