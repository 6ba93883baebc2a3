"""Shared fixtures: real DuckDB files and real FAISS indexes in tmp dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bkg_kernel.store import Store


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = Store(data_dir)
    yield s
    s.close()
