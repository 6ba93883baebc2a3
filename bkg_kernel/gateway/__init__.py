"""The gateway: one process that owns the store, supervises the plugins and serves REST + WebSocket."""

from bkg_kernel.gateway.app import create_app

__all__ = ["create_app"]
