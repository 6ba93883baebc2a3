"""The notebook client of the bkg gateway: `wb = bkg.connect()`, then `wb.llm`, `wb.brain`, `wb.faces`, ...

Modules by job, imported one way: `transport` (HTTP, errors, SSE) <- `collections`, `plugins` <- `llm`,
`brain`, `faces` <- `workbench` (connect, the Workbench) <- `magics` (`%%chat`).
"""

from __future__ import annotations

from bkg_kernel.client.transport import raise_for_error
from bkg_kernel.client.workbench import Workbench, connect, gateway_url

__all__ = ["Workbench", "connect", "gateway_url", "raise_for_error"]
