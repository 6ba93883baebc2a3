"""rustyface's page: galleries, enroll by upload, identify by upload with the faces boxed and named."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, error_html, table


def _b64(upload: Any) -> str:
    return base64.b64encode(bytes(upload["content"])).decode()


def faces_panel(session: Session) -> W.VBox:
    """Show rustyface's galleries (each as a grid of face thumbnails per subject); enroll photos of a subject;
    identify the faces in a photo (boxed and named, with every candidate's similarity drawn)."""
    from bkg_kernel.client.faces import Identified
    from bkg_kernel.pictures.faces import gallery_html
    from bkg_kernel.widgets.pictures import drawing

    faces = session.wb.plugin("rustyface")

    def galleries() -> list[dict[str, Any]]:
        return list(faces.invoke("faces.gallery", action="list")["galleries"])

    gallery = W.Combobox(
        options=[g["gallery"] for g in galleries()], description="gallery", placeholder="name (new ones are created)"
    )
    subject = W.Text(description="subject")
    upload_enroll = W.FileUpload(accept="image/*", multiple=True, description="Enroll photos")
    upload_identify = W.FileUpload(accept="image/*", description="Identify a photo")
    listing = W.HTML()
    grid = W.HTML()
    out = W.VBox([])

    def refresh() -> None:
        known = galleries()
        gallery.options = [g["gallery"] for g in known]
        if not known:
            listing.value = (
                "<h3>Galleries</h3><p class='bkg-empty'>No gallery yet: type a name in <i>gallery</i>, a subject's "
                "name, and enroll a few photos of them.</p>"
            )
        else:
            listing.value = "<h3>Galleries</h3>" + table(known, ["gallery", "faces"])
        show_grid()

    def show_grid(_: Any = None) -> None:
        if gallery.value not in gallery.options:
            grid.value = ""
            return
        try:
            r = faces.invoke("faces.subjects", gallery=gallery.value, action="faces", per_subject=12)
            grid.value = f"<h4>{escape(gallery.value)}</h4>" + gallery_html(gallery.value, r["subjects"])
        except Exception as exc:  # noqa: BLE001
            grid.value = error_html(exc)

    def enroll(_: Any) -> None:
        try:
            if gallery.value not in [g["gallery"] for g in galleries()]:
                faces.invoke("faces.gallery", action="create", gallery=gallery.value)
            photos = upload_enroll.value
            r = faces.invoke(
                "faces.enroll", gallery=gallery.value, subject=subject.value,
                images=[_b64(f) for f in photos], sources=[f["name"] for f in photos],
            )  # fmt: skip
            out.children = [W.HTML(f"<p>Enrolled {len(r['enrolled'])} face(s); skipped {len(r['skipped'])}.</p>")]
        except Exception as exc:  # noqa: BLE001
            out.children = [W.HTML(error_html(exc))]
        refresh()

    def identify(_: Any) -> None:
        try:
            photo = _b64(upload_identify.value[0])
            found = faces.invoke("faces.identify", gallery=gallery.value, image=photo)
            if drawing():
                from bkg_kernel.pictures.faces import identify_view
                from bkg_kernel.pictures.loader import as_widget

                out.children = [as_widget(identify_view(found, photo, session.wb.url))]
            else:
                out.children = [W.HTML(Identified(found, photo)._repr_html_())]
        except Exception as exc:  # noqa: BLE001
            out.children = [W.HTML(error_html(exc))]

    upload_enroll.observe(enroll, "value")
    upload_identify.observe(identify, "value")
    gallery.observe(show_grid, "value")
    refresh()
    return W.VBox(
        [plugin_actions(session, "rustyface"), listing, gallery, subject, upload_enroll, upload_identify, out, grid]
    )
