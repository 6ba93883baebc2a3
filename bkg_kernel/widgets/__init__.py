"""Reusable dashboard panels (ipywidgets) over the gateway: the Voila dashboards in `dashboards/` are built
from these, and the same panels work in any notebook.

    from bkg_kernel import widgets as w
    w.dashboard(w.plugins_panel, scope="plugins:read")    # a login box first, then the panel

Every panel takes a `Session` (a logged-in `Workbench` and the caller's scopes) and shows only what those
scopes allow; a call the gateway refuses shows its message in the panel, never a traceback.

Modules, imported in one direction (each from those above it only):

- `primitives`: the `Session`, CSS, tables, badges, sparklines, error display, ask-first confirmation
- `schema_form`: a form built from a JSON Schema (plugin settings)
- `login`: which gateway, the login box, `dashboard()`
- `ops`: plugins live, start / stop / restart, settings, health, audit, the overview page
- `models`: the model registry
- `admin`: API keys, users, roles (the apikeys plugin's page)
- `jobs`: notebook runs, schedules and background jobs
- `collections`: the store's collections and their snapshots (take, restore, delete; drop)
- `pictures`: the explorer page, telemetry charts, the training form (Panel views from `bkg_kernel.pictures`)
- `llm`, `brain`, `faces`, `candle`, `repo`: one page per plugin
"""

from __future__ import annotations

from bkg_kernel.widgets.admin import apikeys_panel, keys_panel, users_panel
from bkg_kernel.widgets.brain import brain_panel
from bkg_kernel.widgets.candle import candle_panel
from bkg_kernel.widgets.collections import collections_panel
from bkg_kernel.widgets.faces import faces_panel
from bkg_kernel.widgets.jobs import jobs_panel
from bkg_kernel.widgets.llm import llm_panel
from bkg_kernel.widgets.login import dashboard, login_box
from bkg_kernel.widgets.models import models_panel
from bkg_kernel.widgets.ops import (
    audit_panel,
    health_panel,
    overview,
    plugin_actions,
    plugins_panel,
    settings_panel,
)
from bkg_kernel.widgets.pictures import explorer_panel
from bkg_kernel.widgets.primitives import Session
from bkg_kernel.widgets.repo import repo_panel

__all__ = [
    "Session",
    "apikeys_panel",
    "audit_panel",
    "brain_panel",
    "candle_panel",
    "collections_panel",
    "dashboard",
    "explorer_panel",
    "faces_panel",
    "health_panel",
    "jobs_panel",
    "keys_panel",
    "llm_panel",
    "login_box",
    "models_panel",
    "overview",
    "plugin_actions",
    "plugins_panel",
    "repo_panel",
    "settings_panel",
    "users_panel",
]
