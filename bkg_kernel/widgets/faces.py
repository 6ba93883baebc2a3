"""rustyface's page: galleries, enroll by upload, identify by upload with the faces boxed and named."""

from __future__ import annotations

import base64
from typing import Any

import ipywidgets as W

from bkg_kernel.widgets.ops import plugin_actions
from bkg_kernel.widgets.primitives import Session, error_html, table


def _b64(upload: Any) -> str:
    return base64.b64encode(bytes(upload["content"])).decode()


def faces_panel(session: Session) -> W.VBox:
    """Show rustyface's galleries; enroll photos of a subject; identify the faces in a photo."""
    from bkg_kernel.client.faces import Identified

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
    out = W.HTML()

    def refresh() -> None:
        known = galleries()
        gallery.options = [g["gallery"] for g in known]
        listing.value = "<h3>Galleries</h3>" + table(known, ["gallery", "faces"])

    def enroll(_: Any) -> None:
        try:
            if gallery.value not in [g["gallery"] for g in galleries()]:
                faces.invoke("faces.gallery", action="create", gallery=gallery.value)
            photos = upload_enroll.value
            r = faces.invoke(
                "faces.enroll", gallery=gallery.value, subject=subject.value,
                images=[_b64(f) for f in photos], sources=[f["name"] for f in photos],
            )  # fmt: skip
            out.value = f"<p>Enrolled {len(r['enrolled'])} face(s); skipped {len(r['skipped'])}.</p>"
        except Exception as exc:  # noqa: BLE001
            out.value = error_html(exc)
        refresh()

    def identify(_: Any) -> None:
        try:
            photo = _b64(upload_identify.value[0])
            found = faces.invoke("faces.identify", gallery=gallery.value, image=photo)
            out.value = Identified(found, photo)._repr_html_()
        except Exception as exc:  # noqa: BLE001
            out.value = error_html(exc)

    upload_enroll.observe(enroll, "value")
    upload_identify.observe(identify, "value")
    refresh()
    return W.VBox(
        [plugin_actions(session, "rustyface"), listing, gallery, subject, upload_enroll, upload_identify, out]
    )
