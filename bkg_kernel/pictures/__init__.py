"""Pictures where people would rather look than read: Panel (Bokeh) views of collections, retrieval, training,
telemetry and faces, used by the Voila dashboards and in any notebook.

    wb.collection("docs").explore(color="label")     # a map of the collection's vectors
    from bkg_kernel import pictures
    pictures.retrieval_view(wb.brain.query("docs", "solar panels", explain=True))
    pictures.training_report(wb.brain.train("docs", "label"))
    pictures.telemetry_view(wb)                          # live; .stop() ends its refresh
    pictures.faces_gallery(wb, "people")

Panel's styles and scripts come from the gateway (`use_panel`), never from a CDN. Modules:

- `loader`: Panel set up to load its resources from the gateway; a Panel object as an ipywidget
- `charts`: colours, number formats and the Bokeh figure every view starts from
- `explorer`: a collection as a 2-D map (PCA or UMAP) with hover, selection and nearest neighbours
- `retrieval`, `training`, `telemetry`, `faces`: one view each
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Explorer", "faces_gallery", "identify_view", "retrieval_view", "telemetry_view", "training_report", "use_panel",
]  # fmt: skip


def __getattr__(name: str) -> Any:  # Panel and Bokeh load on first use: `import bkg_kernel` stays cheap
    modules = {
        "Explorer": "explorer", "retrieval_view": "retrieval", "training_report": "training",
        "telemetry_view": "telemetry", "faces_gallery": "faces", "identify_view": "faces", "use_panel": "loader",
    }  # fmt: skip
    if name not in modules:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"bkg_kernel.pictures.{modules[name]}"), name)
