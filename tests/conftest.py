"""Shared fixtures: real DuckDB files and real FAISS indexes in tmp dirs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Model registries written by tests (and plugins run in-process) go to a scratch dir, never the repo's models/.
os.environ.setdefault("BKG_MODEL_DIR", tempfile.mkdtemp(prefix="bkg-test-models-"))

from bkg_kernel.store import Store


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = Store(data_dir)
    yield s
    s.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[object]:
    """One real gateway per test module; a module that needs no plugin worker names the ones it uses (PLUGINS),
    sparing the 5-7 s of CPU that starting all seven costs on two cores; GATEWAY_ENV: settings of its own."""
    from gateway_harness import start_gateway

    data = tmp_path_factory.mktemp("gw") / "data"
    module = request.module
    g = start_gateway(data, env=getattr(module, "GATEWAY_ENV", None), plugins=getattr(module, "PLUGINS", None))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def voila(gw: object, request: pytest.FixtureRequest) -> Iterator[str]:
    """The dashboards, served the way `bkg dashboards` serves them, against the module's gateway (log in
    test-artifacts/ui/voila-<module>.log)."""
    from gateway_harness import dashboards

    artifacts = Path(__file__).resolve().parent.parent / "test-artifacts" / "ui"
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts / f"voila-{request.module.__name__}.log"  # type: ignore[attr-defined]
    # a module may name the dashboards it opens (PREHEAT); the others are not preheated there
    with dashboards(gw.url, log, getattr(request.module, "PREHEAT", None)) as url:  # type: ignore[attr-defined]
        yield url


@pytest.fixture(scope="module")
def browser(voila: str) -> Iterator[object]:
    """Debian's Chromium, once the dashboards are up."""
    from gateway_harness import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
