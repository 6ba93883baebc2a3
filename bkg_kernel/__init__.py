"""bkg_kernel: the library behind bkg, a notebook-first ML research workbench.

Importing it is cheap: heavy libraries (faiss, torch, llama_cpp, insightface) load inside the code that needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bkg_kernel.errors import BkgError

if TYPE_CHECKING:
    from bkg_kernel.client import Workbench

__version__ = "0.1.0"
__all__ = ["BkgError", "__version__", "connect"]


def connect(url: str | None = None, **kwargs: Any) -> Workbench:
    """Connect to the gateway of this data dir (starting one in the background when none runs)."""
    from bkg_kernel.client import connect as _connect

    return _connect(url, **kwargs)
