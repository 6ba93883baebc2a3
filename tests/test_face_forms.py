"""rustyface's uploads (`POST /api/faces/{capability}`, multipart) through a real gateway with the real YuNet +
SFace models and real photos: a field the capability takes as text keeps its text (a gallery `2024`, a subject
`42` or `null`), the others are read as JSON as before, and a list of images is one file field per image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import insightface
import pytest
from gateway_harness import Gateway, start_gateway
from helpers import astronaut, hanks, jpeg

IMAGES = Path(insightface.__file__).parent / "data" / "images"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("face-forms") / "data", plugins=["rustyface"])
    yield g
    g.stop()


@pytest.fixture(scope="module")
def c(gw: Gateway) -> Iterator[httpx.Client]:
    with gw.client() as client:
        yield client


def form(**fields: str) -> list[tuple[str, Any]]:
    """Text fields as multipart parts (no file name), for a capability that takes no image."""
    return [(k, (None, v)) for k, v in fields.items()]


def test_names_that_read_as_json_keep_their_text(c: httpx.Client) -> None:
    r = c.post("/api/plugins/rustyface/invoke/faces.gallery", json={"action": "create", "gallery": "2024"})
    assert r.status_code == 200, r.text
    a = astronaut()
    two = [
        ("images", ("a.jpg", jpeg(a), "image/jpeg")),
        ("images", ("b.jpg", jpeg(a.resize((256, 256))), "image/jpeg")),
    ]
    r = c.post("/api/faces/enroll", files=two, data={"gallery": "2024", "subject": "42"})
    assert r.status_code == 200, r.text
    assert r.json()["subject"] == "42" and len(r.json()["enrolled"]) == 2
    # each face is named by the file it was uploaded as (it said images[0], images[1])
    assert [e["source"] for e in r.json()["enrolled"]] == ["a.jpg", "b.jpg"]
    r = c.post(
        "/api/faces/enroll",
        files={"images": ("t.jpg", jpeg(hanks()), "image/jpeg")},
        data={"gallery": "2024", "subject": "null", "sources": '["tom.jpg"]', "metadata": '{"year": 2024}'},
    )
    assert r.status_code == 200 and r.json()["enrolled"][0]["source"] == "tom.jpg", r.text  # lists, objects: JSON
    subjects = c.post("/api/faces/subjects", files=form(gallery="2024")).json()["subjects"]
    assert subjects == [{"subject": "42", "faces": 2}, {"subject": "null", "faces": 1}]
    r = c.post("/api/faces/subjects", files=form(gallery="2024", action="rename", subject="null", new_name="true"))
    assert r.status_code == 200 and r.json()["faces"] == 1, r.text
    # identify in gallery 2024; the numbers (top_k, threshold) are still read as numbers
    probe = {"image": ("p.jpg", jpeg(a.crop((30, 0, 512, 480))), "image/jpeg")}
    r = c.post("/api/faces/identify", files=probe, data={"gallery": "2024", "top_k": "1", "threshold": "-1"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["gallery"] == "2024" and out["threshold"] == -1
    assert len(out["faces"]) == 1 and out["faces"][0]["subject"] == "42" and len(out["faces"][0]["matches"]) == 1
    r = c.post("/api/faces/identify", files=probe, data={"gallery": "2024", "top_k": "many"})
    assert r.status_code == 422 and r.json()["error"]["field"].endswith("top_k"), r.text
    tom = c.post(
        "/api/faces/identify", files={"image": ("t.jpg", jpeg(hanks()), "image/jpeg")}, data={"gallery": "2024"}
    )
    assert tom.json()["faces"][0]["subject"] == "true", tom.text
