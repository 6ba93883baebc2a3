"""llmserver's page: its status and telemetry, its models and a playground that reports the answer's token
throughput (the models and the playground need llm:use)."""

from __future__ import annotations

import time
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, enable_when_picked, error_html, table


def llm_panel(session: Session) -> W.VBox:
    """Show llmserver's status and telemetry; with llm:use, its models and a playground with tokens per second."""
    actions = plugin_actions(session, "llmserver")
    if not session.can("llm:use"):
        note = "<p class='bkg-empty'>The models and the playground need the scope <code>llm:use</code>.</p>"
        return W.VBox([actions, W.HTML(note)])
    try:
        models = session.wb.call("GET", "/v1/models")["data"]
    except Exception as exc:  # noqa: BLE001 - llmserver stopped, say: its status and Start stay usable
        return W.VBox([actions, W.HTML(error_html(exc))])
    pick = W.Dropdown(options=[m["id"] for m in models], description="model")
    prompt = W.Textarea(placeholder="Ask something", layout=W.Layout(width="600px"))
    go = W.Button(description="Send", button_style="primary")
    enable_when_picked(pick, [go])
    answer = W.HTML()

    def ask(_: Any) -> None:
        body = {"model": pick.value, "messages": [{"role": "user", "content": prompt.value}], "max_tokens": 128}
        t0 = time.perf_counter()
        try:
            r = session.wb.call("POST", "/v1/chat/completions", json=body)
        except Exception as exc:  # noqa: BLE001
            answer.value = error_html(exc)
            return
        took = time.perf_counter() - t0
        n = r["usage"]["completion_tokens"]
        answer.value = (
            f"<pre class='bkg-answer'>{escape(r['choices'][0]['message']['content'])}</pre>"
            f"<p>{n} tokens in {took:.2f} s: {n / took:.1f} tokens/s</p>"
        )

    go.on_click(ask)
    listing = W.HTML(table(models, ["id", "owned_by"]))
    return W.VBox([actions, listing, pick, prompt, go, answer])
