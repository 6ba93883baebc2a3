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
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real gateway per test module."""
    from gateway_harness import start_gateway

    g = start_gateway(tmp_path_factory.mktemp("gw") / "data")
    yield g
    g.stop()
