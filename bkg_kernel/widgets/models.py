"""The model registry: every model with its size, licence and checksum; verify one, add one by path."""

from __future__ import annotations

from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.display import fmt_bytes
from bkg_kernel.widgets.primitives import Session, enable_when_picked, error_html, set_options, table


def models_panel(session: Session) -> W.VBox:
    """List every registered model; verify one (sha256); add one by path."""
    out = W.HTML()
    pick = W.Dropdown(description="model")
    verify = W.Button(description="Verify")
    path = W.Text(description="path", placeholder="/path/to/model.gguf or folder")
    add = W.Button(description="Add (copy into the model dir)", disabled=not session.can("models:write"))
    message = W.HTML()

    def refresh() -> None:
        models = session.wb.call("GET", "/api/models")["models"]
        set_options(pick, [m["id"] for m in models])
        rows = [{**m, "size": fmt_bytes(m["size"]), "sha256": m["sha256"][:12]} for m in models]
        out.value = table(rows, ["id", "kind", "size", "license", "source", "sha256"])

    def do_verify(_: Any) -> None:
        try:
            r = session.wb.verify_model(pick.value)
            message.value = f"<p>{escape(pick.value)}: {'ok' if r.get('ok') else escape(str(r))}</p>"
        except Exception as exc:  # noqa: BLE001
            message.value = error_html(exc)

    def do_add(_: Any) -> None:
        try:
            r = session.wb.add_model(path.value.strip(), import_mode="copy")
            message.value = f"<p>Added {escape(str(r.get('id', r)))}.</p>"
        except Exception as exc:  # noqa: BLE001
            message.value = error_html(exc)
        refresh()

    enable_when_picked(pick, [verify])
    verify.on_click(do_verify)
    add.on_click(do_add)
    refresh()
    return W.VBox([out, W.HBox([pick, verify]), W.HBox([path, add]), message])
