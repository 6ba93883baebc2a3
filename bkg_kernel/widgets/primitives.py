"""What every panel is built from: the `Session` it gets, the page CSS, tables, status badges, sparklines,
error display and the ask-first confirmation row."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.client import Workbench
from bkg_kernel.display import html_table
from bkg_kernel.errors import user_message

STATE_COLOURS = {
    "running": "#2e7d32", "degraded": "#ed6c02", "starting": "#0277bd", "stopping": "#0277bd",
    "error": "#c62828", "failed": "#c62828", "stopped": "#616161", "disabled": "#616161",
}  # fmt: skip
# JupyterLab's theme variables (with light fallbacks), so the dashboards follow Voila's light and dark themes.
CSS = """<style>
.bkg-dash table, table.bkg-table {border-collapse: collapse; width: 100%; font-size: 13px}
.bkg-dash th, .bkg-dash td, .bkg-table th, .bkg-table td {
  border-bottom: 1px solid var(--jp-border-color2, #ddd); padding: 3px 8px; text-align: left}
.bkg-badge {border-radius: 8px; padding: 1px 7px; color: white; font-weight: 600}
.bkg-error, .bkg-failed {color: #e53935}
.bkg-empty {color: var(--jp-ui-font-color2, #666); font-style: italic}
.bkg-spark {background: var(--jp-layout-color2, #f3f3f3)}
.bkg-spark polyline {fill: none; stroke: #1976d2; stroke-width: 1.5}
.bkg-nav {display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: baseline; font-size: 13px;
  border-bottom: 1px solid var(--jp-border-color2, #ddd); padding: 4px 0 8px; margin-bottom: 6px}
.bkg-nav a {color: var(--jp-content-link-color, #1976d2); text-decoration: none}
.bkg-nav a.bkg-here {font-weight: 700; color: var(--jp-ui-font-color0, #111)}
.bkg-nav .bkg-brand {font-weight: 700; margin-right: 8px}
.bkg-who {font-size: 13px; color: var(--jp-ui-font-color1, #333)}
</style>"""


@dataclass
class Session:
    """A logged-in client and who it is."""

    wb: Workbench
    me: dict[str, Any]
    timers: list[threading.Event] = field(default_factory=list)

    def can(self, scope: str) -> bool:
        """Return whether this login holds `scope`."""
        return scope in self.me.get("scopes", [])

    def every(self, seconds: float, fn: Callable[[], None]) -> None:
        """Call `fn` every `seconds` on a background thread until the kernel goes away."""
        stop = threading.Event()
        self.timers.append(stop)

        def loop() -> None:
            while not stop.wait(seconds):
                with contextlib.suppress(Exception):  # a failed refresh shows at the next one
                    fn()

        threading.Thread(target=loop, daemon=True).start()

    def use_secret(self, secret: str) -> None:
        """Go on with `secret`, the new secret of the key this session logged in with (it was rotated)."""
        self.wb = Workbench(self.wb.url, secret, self.wb.timeout)
        self.me = self.wb.me()


def badge(state: str, label: str | None = None) -> str:
    """Return a plugin or job state as a coloured badge (showing `label` instead of the state, if given)."""
    colour = STATE_COLOURS.get(state, "#616161")
    return f"<span class='bkg-badge' style='background:{colour}'>{escape(state if label is None else label)}</span>"


def error_text(exc: Exception) -> str:
    """Return what a user is told about `exc` (see `errors.user_message`)."""
    return user_message(exc)


def error_html(exc: Exception) -> str:
    """Return `exc` as a red paragraph (never a traceback)."""
    return f"<p class='bkg-error'>{escape(error_text(exc))}</p>"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str], raw: Sequence[str] = ()) -> str:
    """Return rows as a dashboard table; cells in the `raw` columns are trusted HTML (badges, sparklines)."""
    return f"<div class='bkg-dash'>{html_table(list(columns), rows, raw=raw)}</div>"


def sparkline(values: list[float], width: int = 160, height: int = 36) -> str:
    """Return `values` as a small SVG line, scaled to their maximum."""
    if len(values) < 2:
        return f"<svg class='bkg-spark' width='{width}' height='{height}'></svg>"
    top = max(max(values), 1e-9)
    pts = " ".join(
        f"{i * width / (len(values) - 1):.1f},{height - 2 - v / top * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return f"<svg class='bkg-spark' width='{width}' height='{height}'><polyline points='{pts}'/></svg>"


def set_options(pick: W.Dropdown, options: Sequence[Any]) -> None:
    """Offer `options` (values shown as they are) in `pick`, keeping its choice while it is offered, else choosing
    the first: ipywidgets 8 chooses none when options come after the widget, and a button would act on None."""
    options = list(options)
    if list(pick.options) == options and (pick.value is not None or not options):
        return
    keep = pick.value
    pick.options = options
    if options:
        pick.value = keep if keep in options else options[0]


def enable_when_picked(pick: W.Dropdown, buttons: Sequence[W.Button], allowed: bool = True) -> None:
    """Keep `buttons` disabled while `pick` has nothing chosen (and for good unless `allowed`)."""

    def sync(_: Any = None) -> None:
        for b in buttons:
            b.disabled = not allowed or pick.value is None

    pick.observe(sync, "value")
    sync()


def ask_first(
    box: W.Box,
    question: str,
    yes: str,
    on_yes: Callable[[], None],
    on_cancel: Callable[[], None] | None = None,
) -> None:
    """Fill `box` with `question` (HTML) and a red `yes` button and Cancel; Cancel empties it unless `on_cancel`."""
    confirm = W.Button(description=yes, button_style="danger")
    cancel = W.Button(description="Cancel")
    confirm.on_click(lambda _: on_yes())
    cancel.on_click(lambda _: on_cancel() if on_cancel else setattr(box, "children", []))
    box.children = [W.HTML(question), confirm, cancel]
