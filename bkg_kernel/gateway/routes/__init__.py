"""The gateway's route modules, mounted in one place (`install`)."""

from __future__ import annotations

from fastapi import FastAPI

from bkg_kernel.gateway.routes import (
    admin,
    assets,
    auth,
    collections,
    core,
    embed,
    hublogin,
    jobs,
    live,
    models,
    plugins,
)


def install(app: FastAPI) -> None:
    """Mount every core router. Routes match in registration order (a linear scan): the health and plugin routes
    the panels poll come first."""
    for module in (core, auth, plugins, live, collections, embed, admin, models, jobs, hublogin, assets):
        app.include_router(module.router)
    app.include_router(collections.snapshots_router)
