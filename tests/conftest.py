"""Shared fixtures: real DuckDB files and real FAISS indexes in tmp dirs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Model registries written by tests (and plugins run in-process) go to a scratch dir, never the repo's models/: one
# per pytest-xdist worker (`make test` runs two), which would otherwise inherit the controller's.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    os.environ["BKG_MODEL_DIR"] = tempfile.mkdtemp(prefix=f"bkg-test-models-{_WORKER}-")
    # Each worker's model runtimes (torch, llama.cpp, numpy / faiss, numba) get their share of the cores: two workers
    # each spinning as many threads as there are cores took 20% more CPU and stretched a llama.cpp test 29 s -> 194 s.
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, _share)
elif "BKG_MODEL_DIR" not in os.environ:
    os.environ["BKG_MODEL_DIR"] = tempfile.mkdtemp(prefix="bkg-test-models-")
if os.path.basename(os.environ["BKG_MODEL_DIR"]).startswith("bkg-test-models-"):  # ours: gone with the session
    atexit.register(shutil.rmtree, os.environ["BKG_MODEL_DIR"], True)

from bkg_kernel.store import Store  # noqa: E402 (after BKG_MODEL_DIR is set)

# The test files that take longest (seconds on two cores, `--durations=0` of a whole run), started first so that
# two workers finish together (`make test`: --dist loadfile --no-loadscope-reorder); the others keep their order.
LONGEST_FIRST = {
    "test_dashboards.py": 315, "test_pictures.py": 200, "test_brainml_learning.py": 180, "test_jobs.py": 88,
    "test_repoagent.py": 88, "test_cli.py": 77, "test_jupyterhub.py": 73, "test_candle.py": 65, "test_run.py": 63,
    "test_lab_extension.py": 62, "test_notebooks.py": 58, "test_gateway_openapi.py": 57, "test_login.py": 46,
    "test_llmserver.py": 43, "test_durability.py": 39, "test_no_stall.py": 38, "test_gateway_runtime.py": 36,
}  # fmt: skip


# The files that start Jupyter kernels (Voila, JupyterLab, papermill, the Hub's servers) run on one worker, one after
# another: a TCP kernel's ports are picked free, then bound by the kernel a second later, so two launchers at once
# can take each other's ports. The kernels bkg starts now use Unix sockets (bkg_kernel/kernels.py; the failure seen,
# "Address already in use", came from another process taking a port in that second); the notebook tests' nbclient
# kernels are still on TCP.
STARTS_KERNELS = {
    "test_dashboards.py", "test_pictures.py", "test_jobs.py", "test_jupyterhub.py", "test_run.py",
    "test_lab_extension.py", "test_notebooks.py",
}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -LONGEST_FIRST.get(item.path.name, 0))  # stable: a file's tests keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile`, with the files that start kernels as one unit of work (another mode: xdist's own)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class KernelFilesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "jupyter-kernels" if Path(file).name in STARTS_KERNELS else file

    return KernelFilesTogether(config, log)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = Store(data_dir)
    yield s
    s.close()


@pytest.fixture
def filled(data_dir: Path) -> Iterator[Any]:
    """`filled(names, dim)`: a `Store` of `data_dir` with a filled collection of each name
    (`helpers.filled_store`), closed after the test."""
    from helpers import filled_store

    made: list[Store] = []

    def make(names: tuple[str, ...], dim: int) -> Store:
        made.append(filled_store(data_dir, names, dim))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def login(gw: Any) -> Iterator[Any]:
    """`login(key)`: a dashboard's `Session` on the module's gateway, logged in as a dashboard logs in
    (`Session(wb, wb.me())`); the panels' refresh threads stop after the test."""
    from bkg_kernel.client import Workbench
    from bkg_kernel.widgets import Session

    made: list[Session] = []

    def as_key(key: str) -> Session:
        wb = Workbench(gw.url, key)
        made.append(Session(wb, wb.me()))
        return made[-1]

    yield as_key
    for s in made:
        for stop in s.timers:
            stop.set()


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
