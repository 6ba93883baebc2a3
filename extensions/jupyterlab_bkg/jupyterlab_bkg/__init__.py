"""jupyterlab_bkg: the bkg lab extension (prebuilt, no Node needed to install) and its server extension.

The server extension forwards `/bkg/api/*` and the WebSocket `/bkg/ws` to the bkg gateway under Jupyter's own
authentication, holding the gateway key on the server side.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "jupyterlab-bkg"}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "jupyterlab_bkg"}]


def _load_jupyter_server_extension(server_app: Any) -> None:
    from jupyterlab_bkg.handlers import setup_handlers

    setup_handlers(server_app)
