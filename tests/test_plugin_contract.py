"""The plugin contract, in-process: declaration, JSON Schemas, validation, and `bkg.local()`."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from pydantic import BaseModel

import bkg_kernel as bkg
from bkg_kernel.errors import InvalidInput, NotFound, Unavailable
from bkg_kernel.plugins.sysinfo import SysInfo
from bkg_kernel.runtime.contract import JSONResult, Plugin, capability


def test_declaration_builds_schemas() -> None:
    d = SysInfo.describe()
    assert (d["id"], d["mode"]) == ("sysinfo", "worker")
    caps = {c["id"]: c for c in d["capabilities"]}
    assert (
        caps["sysinfo.facts"]["scope"] == "plugins:read" and caps["sysinfo.facts"]["summary"] == "Report machine facts."
    )
    assert "cpu_count" in caps["sysinfo.facts"]["output_schema"]["properties"]
    assert d["settings_schema"]["properties"]["disk_path"]["default"] == "."


def test_local_runs_a_plugin_in_process(tmp_path: Path) -> None:
    p = bkg.local("sysinfo", data_dir=str(tmp_path), disk_path=str(tmp_path))
    try:
        facts = p.invoke("sysinfo.facts", {})
        assert facts["cpu_count"] >= 1 and facts["disk_total"] > 0
        assert p.invoke("sysinfo.sleep", {"seconds": 0})["slept"] >= 0
        with pytest.raises(InvalidInput) as err:
            p.invoke("sysinfo.sleep", {"seconds": "long"})
        assert err.value.field == "input.seconds"
        with pytest.raises(NotFound):
            p.invoke("sysinfo.nope", {})
    finally:
        p.stop()
    with pytest.raises(InvalidInput) as err:
        bkg.local("sysinfo", max_concurrent=0)
    assert err.value.field == "settings.max_concurrent"
    with pytest.raises(NotFound):
        bkg.local("nope")
    with pytest.raises(Unavailable):
        bkg.local("apikeys").invoke("apikeys.users", {})  # needs the gateway's auth service


class In(BaseModel):
    x: int


class Bad(Plugin):
    id = "bad"
    name = "Bad"

    @capability("bad.two", scope="plugins:read")
    def two(self, a: In, b: In) -> In:
        """Two inputs: not allowed."""
        return a


def test_malformed_capability_is_refused() -> None:
    with pytest.raises(TypeError, match="one pydantic model"):
        Bad.capabilities()


class Page(JSONResult):
    """A free-form answer built from plain JSON values."""


class Typed(BaseModel):
    when: datetime.date
    tags: set[str]


class Pages(Plugin):
    id = "pages"
    name = "Pages"

    @capability("pages.page", scope="plugins:read")
    def page(self, inp: In) -> Page:
        """A page of hits."""
        self.built = Page(hits=[{"id": i, "score": i / 10, "text": "x" * i} for i in range(inp.x)], n=inp.x)
        return self.built

    @capability("pages.typed", scope="plugins:read")
    def typed(self, inp: In) -> Typed:
        """A typed answer: pydantic makes it JSON."""
        return Typed(when=datetime.date(2026, 12, 5), tags={"b"})


def test_a_json_result_is_answered_as_built_and_a_typed_one_made_json(tmp_path: Path) -> None:
    p = Pages()
    page = p.invoke("pages.page", {"x": 3})
    assert page == {"hits": [{"id": i, "score": i / 10, "text": "x" * i} for i in range(3)], "n": 3}
    assert page["hits"] is (p.built.__pydantic_extra__ or {})["hits"]  # not walked and copied again
    assert page == Page.model_validate(page).model_dump(mode="json")  # what pydantic's walk would have made
    assert p.invoke("pages.typed", {"x": 1}) == {"when": "2026-12-05", "tags": ["b"]}
