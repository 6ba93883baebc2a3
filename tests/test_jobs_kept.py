"""The files a run keeps, as jupyter-scheduler keeps a job's output files: what a notebook writes into its run's
folder (`bkg_kernel.jobs.kept.run_files()`, `BKG_RUN_FILES`) is listed and fetched with the run (REST, the notebook
client, the CLI), under the rule of its output notebook, and goes when the run is deleted. A run's folder is its own
(two runs of one notebook keep two files); a link it leaves there (to the admin key) or a hard link is never served.
Real gateway, real job workers and kernels, a real Dask LocalCluster for the cluster path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, submit, wait_run
from helpers import notebook

from bkg_kernel.errors import InvalidInput, NotFound

pytestmark = pytest.mark.slow

WRITES = (
    "from bkg_kernel.jobs.kept import run_files\n"
    "import os\n"
    "out = run_files()\n"
    "(out / 'report.csv').write_text(f'n,{n}\\n')\n"
    "(out / 'plots').mkdir(exist_ok=True)\n"
    "(out / 'plots' / 'a.svg').write_text('<svg/>')\n"
    "os.symlink(os.path.join(os.environ['BKG_DATA_DIR'], 'admin.key'), out / 'key.txt')\n"
    "(out / 'plain.txt').write_text('mine')\n"
    "os.link(out / 'plain.txt', out / 'linked.txt')\n"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("kept").resolve()
    notebook(folder / "writes.ipynb", "n = 1", WRITES)
    return folder


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("kept-gw") / "data", env={"BKG_JOB_ROOTS": str(root)},
                      plugins=["sysinfo"])  # fmt: skip
    yield g
    g.stop()


def _names(gw: Gateway, run_id: str, key: str = ADMIN_KEY) -> list[str]:
    r = gw.client(key).get(f"/api/jobs/{run_id}/files")
    assert r.status_code == 200, r.text
    return [f["name"] for f in r.json()["files"]]


def test_a_run_keeps_what_its_notebook_writes_and_nothing_it_links(gw: Gateway, tmp_path: Path) -> None:
    from bkg_kernel.client import Workbench

    c = gw.client()
    runs = [wait_run(gw, submit(gw, {"notebook": "writes.ipynb", "parameters": {"n": n}})["id"]) for n in (1, 2)]
    assert [r["state"] for r in runs] == ["succeeded", "succeeded"], runs
    first, second = runs[0]["id"], runs[1]["id"]
    assert _names(gw, first) == ["plots/a.svg", "report.csv"]  # the link and the hard-linked pair left out
    r = c.get(f"/api/jobs/{first}/files/report.csv")
    assert r.status_code == 200 and r.text == "n,1\n", r.text
    assert r.headers["content-disposition"].startswith("attachment"), r.headers
    assert "sandbox" in r.headers["content-security-policy"]  # a page it wrote never runs in the gateway's origin
    assert c.get(f"/api/jobs/{second}/files/report.csv").text == "n,2\n"  # a folder each: nothing overwritten
    for name, status in (("key.txt", 404), ("linked.txt", 404), ("plots", 404), ("nope.csv", 404),
                         ("plots/%2E%2E/report.csv", 422)):  # '..' past the client's own tidying: refused  # fmt: skip
        r = c.get(f"/api/jobs/{first}/files/{name}")
        assert r.status_code == status and r.json()["error"]["field"] in ("name", "job_id"), (name, r.text)
        assert ADMIN_KEY not in r.text

    wb = Workbench(gw.url, ADMIN_KEY)
    assert [f["name"] for f in wb.jobs.files(first)] == ["plots/a.svg", "report.csv"]
    assert wb.jobs.file(first, "plots/a.svg", to=tmp_path / "a.svg") == b"<svg/>"
    assert (tmp_path / "a.svg").read_text() == "<svg/>"
    with pytest.raises(NotFound):
        wb.jobs.file(first, "key.txt")
    with pytest.raises(InvalidInput):
        wb.jobs.file(first, "../x")  # 422: '..' names no kept file (sent as a segment of its own: not routed away)

    env = {**os.environ, "BKG_GATEWAY_URL": gw.url, "BKG_API_KEY": ADMIN_KEY}
    cli = [sys.executable, "-m", "bkg_kernel.cli", "jobs", "files", first]
    listed = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0 and "report.csv" in listed.stdout and "plots/a.svg" in listed.stdout, listed
    one = subprocess.run([*cli, "report.csv"], capture_output=True, env=env, timeout=120)
    assert one.returncode == 0 and one.stdout == b"n,1\n", one

    assert c.delete(f"/api/jobs/{first}").status_code == 204
    assert c.get(f"/api/jobs/{first}/files").status_code == 404
    assert not list((gw.data_dir / "runs").glob(f"{first}*")), "the run's kept files stayed behind"
    assert _names(gw, second) == ["plots/a.svg", "report.csv"]


def test_kept_files_are_for_who_may_read_the_runs_output(gw: Gateway) -> None:
    """As its output notebook: the owner's narrower key (403), someone else without admin:audit (404)."""
    c = gw.client()
    assert c.post("/admin/roles", json={"name": "kept-dev", "scopes": ["plugins:read", "jobs:run"]}).status_code == 201
    dev = c.post("/admin/users", json={"username": "kept-dev", "role": "kept-dev"}).json()
    dev_key = c.post("/admin/keys", json={"name": "k", "user_id": dev["id"]}).json()["key"]
    narrow = c.post("/admin/keys", json={"name": "n", "scopes": ["plugins:read"]}).json()["key"]
    run = wait_run(gw, submit(gw, {"notebook": "writes.ipynb"})["id"])
    r = gw.client(narrow).get(f"/api/jobs/{run['id']}/files")
    assert r.status_code == 403 and r.json()["error"]["field"] == "job_id", r.text
    r = gw.client(narrow).get(f"/api/jobs/{run['id']}/files/report.csv")
    assert r.status_code == 403, r.text
    assert gw.client(dev_key).get(f"/api/jobs/{run['id']}/files").status_code == 404
    assert gw.client(dev_key).get(f"/api/jobs/{run['id']}/files/report.csv").status_code == 404


def test_a_run_on_a_dask_cluster_sends_its_kept_files_back(tmp_path: Path, root: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      scheduler_port=0) as cluster:  # fmt: skip
        address = cluster.scheduler_address.replace("tcp://", "dask://")
        env: dict[str, Any] = {"BKG_JOB_ROOTS": str(root), "BKG_JOB_EXECUTOR": address}
        g = start_gateway(tmp_path / "data", env=env, plugins=["sysinfo"])
        try:
            run = wait_run(g, submit(g, {"notebook": "writes.ipynb", "parameters": {"n": 7}})["id"], timeout=300)
            assert run["state"] == "succeeded", run
            assert _names(g, run["id"]) == ["plots/a.svg", "report.csv"]
            assert g.client().get(f"/api/jobs/{run['id']}/files/report.csv").text == "n,7\n"
        finally:
            g.stop()
