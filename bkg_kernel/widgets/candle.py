"""candle's page: the loaded models and their memory; load, run and quantize a model."""

from __future__ import annotations

from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.display import fmt_bytes
from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, enable_when_picked, error_html, set_options, table

CANDLE_KINDS = ("hf-transformers", "torch-program")


def candle_panel(session: Session) -> W.VBox:
    """Show candle's loaded models and their memory; load, run and quantize a model."""
    out = W.HTML()
    result = W.HTML()
    model = W.Dropdown(description="model")
    text = W.Text(description="input", layout=W.Layout(width="500px"))
    load = W.Button(description="Load")
    run = W.Button(description="Run")
    method = W.Dropdown(options=["dynamic-int8", "fp16", "bf16"], description="quantize")
    quantize = W.Button(description="Quantize")

    def refresh() -> None:
        """The registry's candle models (a quantized one is new) and what candle has loaded: each said apart, so
        that a key that may read the plugin but not the registry (the page asks plugins:read) still sees candle."""
        try:
            s = session.wb.plugin("candle").invoke("candle.stats")
            rows = [{**m, "memory": fmt_bytes(m.get("bytes"))} for m in s.get("loaded", [])]
            shown = f"<p>torch {escape(s['torch'])} on {escape(s['device'])}, RSS {fmt_bytes(s['rss_bytes'])}</p>"
            shown += table(rows, ["model_id", "kind", "task", "device", "memory", "load_s"])
        except Exception as exc:  # noqa: BLE001
            shown = error_html(exc)
        try:
            models = session.wb.call("GET", "/api/models")["models"]
            set_options(model, [m["id"] for m in models if m["kind"] in CANDLE_KINDS])
        except Exception as exc:  # noqa: BLE001
            shown += error_html(exc)
        out.value = shown

    def call(cap: str, **body: Any) -> None:
        result.value = f"<p>{escape(cap)}…</p>"
        try:
            r = session.wb.plugin("candle").invoke(cap, **body)
            shown = {k: (f"{len(v)} x {len(v[0])} values" if k == "embeddings" else v) for k, v in r.items()}
            result.value = f"<pre>{escape(str(shown))[:3000]}</pre>"
        except Exception as exc:  # noqa: BLE001
            result.value = error_html(exc)
        refresh()

    load.on_click(lambda _: call("candle.model.load", model_id=model.value))
    run.on_click(lambda _: call("candle.run", model_id=model.value, inputs=[text.value or " "]))
    quantize.on_click(lambda _: call("candle.quantize", model_id=model.value, method=method.value))
    enable_when_picked(model, [load, run, quantize], allowed=session.can("plugins:write"))
    refresh()
    rows = [W.HBox([model, load]), W.HBox([text, run]), W.HBox([method, quantize])]
    return W.VBox([plugin_actions(session, "candle"), out, *rows, result])
