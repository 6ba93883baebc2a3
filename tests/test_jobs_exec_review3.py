"""Notebook jobs, defects found by a third review of how a run executes, against a real gateway with real job
workers and kernels, papermill and a real Dask LocalCluster:

1. a notebook that opens a file next to it failed on the Dask executor (it ran in an empty temporary folder) while
   it worked on the local pool; a worker that cannot see the notebook's folder still runs in one, and says so;
2. a kernel that died (a crash, or killed by a cancel or a timeout) named no cell, and the output notebook marked
   the cell it died in `completed`;
3. the CLI had no `bkg jobs output`, nor papermill's `-y YAML` and `-f FILE` (`-y` read as a broken `-p`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, submit, wait_for, wait_run
from helpers import notebook

pytestmark = pytest.mark.slow
BKG = [sys.executable, "-m", "bkg_kernel.cli"]
READS = "import os\nprint('cwd', os.getcwd())\nprint(open('data.txt').read())"


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobroots_exec3")
    (root / "data.txt").write_text("the data next to the notebook\n")
    notebook(root / "reads.ipynb", "n = 1", READS)
    notebook(root / "crash.ipynb", "n = 1", "a = n + 1", "import os\nos._exit(1)", "print('never')")
    notebook(root / "sleepy.ipynb", "seconds = 120.0", "import time\ntime.sleep(seconds)", "print('never')")
    notebook(root / "params.ipynb", "n = 1\nname = 'x'\nday = ''\nitems = []",
             "import json\nprint(json.dumps({'n': n, 'name': name, 'day': day, 'items': items}))")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, roots: Path) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("jobs_exec3") / "data", env={"BKG_JOB_ROOTS": str(roots)},
                      plugins=["sysinfo"])  # fmt: skip
    yield g
    g.stop()


def printed(path: str, cell: int = -1) -> str:
    out = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for o in out.cells[cell].get("outputs", []))


def bkg(gw: Gateway, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BKG_", "JUPYTERHUB_"))}
    env = {**clean, "BKG_GATEWAY_URL": gw.url, "BKG_API_KEY": ADMIN_KEY}
    return subprocess.run([*BKG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def marked_failed(path: str, source: str) -> None:
    """The output notebook marks the cell whose source holds `source` as papermill marks a cell that raised."""
    out = nbformat.read(path, as_version=4)
    banner = [c for c in out.cells if "papermill-error-cell-tag" in c.metadata.get("tags", [])]
    assert len(banner) == 2 and "An Exception was encountered" in banner[0].source  # the banner and its anchor
    at = next(i for i, c in enumerate(out.cells) if c.cell_type == "code" and source in c.source)
    cell = out.cells[at]
    assert cell.metadata.papermill["status"] == "failed" and cell.metadata.papermill["exception"] is True
    assert [o["output_type"] for o in cell.outputs][-1:] == ["error"]
    assert out.cells[at - 1] is banner[1]  # the anchor the banner links to sits just before it
    assert out.metadata.papermill["exception"] is True
    assert all(c.metadata.papermill["status"] == "pending" for c in out.cells[at + 1 :] if c.cell_type == "code")


# -- 1: the same job on a Dask cluster -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      scheduler_port=0) as c:  # fmt: skip
        yield c


def test_a_notebook_reads_the_file_next_to_it_on_a_local_cluster_as_on_the_local_pool(
    gw: Gateway, roots: Path, cluster: Any, tmp_path: Path
) -> None:
    local = wait_run(gw, submit(gw, {"notebook": "reads.ipynb"})["id"])
    assert local["state"] == "succeeded", local
    assert f"cwd {roots}\n" in printed(local["output_path"])
    assert "the data next to the notebook" in printed(local["output_path"])
    address = cluster.scheduler_address.replace("tcp://", "dask://")
    g = start_gateway(tmp_path / "data", env={"BKG_JOB_ROOTS": str(roots), "BKG_JOB_EXECUTOR": address},
                      plugins=["sysinfo"])  # fmt: skip
    try:
        done = wait_run(g, submit(g, {"notebook": "reads.ipynb", "parameters": {"n": 2}})["id"])
        assert done["state"] == "succeeded" and done["executor"] == address, done  # FileNotFoundError before
        assert f"cwd {roots}\n" in printed(done["output_path"])
        assert "the data next to the notebook" in printed(done["output_path"])
        crashed = wait_run(g, submit(g, {"notebook": "crash.ipynb"})["id"])  # item 2, on the cluster too
        assert crashed["state"] == "failed" and crashed["error"]["cell_index"] == 2, crashed
        marked_failed(crashed["output_path"], "os._exit(1)")
    finally:
        g.stop()


def test_a_worker_that_does_not_see_the_notebooks_folder_runs_it_in_a_temp_folder_and_says_so(
    roots: Path, cluster: Any, tmp_path: Path
) -> None:
    """A remote worker, as a LocalCluster can show one: the path the gateway names holds another notebook there."""
    from distributed import Client

    from bkg_kernel.jobs.cluster import run_task

    sent = notebook(tmp_path / "sent.ipynb", "n = 1", READS).read_text(encoding="utf-8")
    spec = {
        "id": "remote1", "input": str(roots / "sleepy.ipynb"), "output": str(tmp_path / "o.ipynb"),
        "html": str(tmp_path / "o.html"), "parameters": {}, "cwd": str(roots), "env": {}, "notebook_json": sent,
    }  # fmt: skip
    with Client(cluster) as client:
        result = client.submit(run_task, spec, key="bkg-run-remote1", pure=False).result(timeout=300)
    err = result["done"]["error"]
    assert err["ename"] == "FileNotFoundError" and err["cell_index"] == 1, err
    assert "ran in a temporary folder on Dask worker" in err["traceback"] and str(roots) in err["traceback"]
    assert result["note"] and str(roots) in result["note"]
    out = nbformat.reads(result["output"], as_version=4)
    cwd = "".join(o.get("text", "") for o in out.cells[-1].outputs).split("\n")[0]
    assert cwd.startswith("cwd ") and "bkg-run-" in cwd and str(roots) not in cwd, cwd


# -- 2: a kernel that dies names its cell ---------------------------------------------------------------------------


def test_a_kernel_that_dies_names_its_cell_and_the_output_marks_it(gw: Gateway) -> None:
    done = wait_run(gw, submit(gw, {"notebook": "crash.ipynb", "parameters": {"n": 2}})["id"])  # injected cell too
    assert done["state"] == "failed", done
    err = done["error"]
    assert err["cell_index"] == 2 and "os._exit(1)" in err["source"], err  # as written: the injected cell not counted
    assert err["ename"] == "DeadKernelError" and "exit code 1" in err["evalue"], err
    marked_failed(done["output_path"], "os._exit(1)")
    assert "os._exit" in gw.client().get(f"/api/jobs/{done['id']}/output", params={"format": "html"}).text


def test_a_cancelled_or_timed_out_run_names_the_cell_it_was_in(gw: Gateway) -> None:
    run = submit(gw, {"notebook": "sleepy.ipynb", "parameters": {"seconds": 300.0}})
    c = gw.client()
    wait_for(lambda: c.get(f"/api/jobs/{run['id']}").json()["message"] == "cell 1 running", 60)
    assert c.post(f"/api/jobs/{run['id']}/cancel").status_code == 200
    done = wait_run(gw, run["id"], timeout=60)
    assert done["state"] == "cancelled", done
    err = done["error"]
    assert (err["ename"], err["evalue"]) == ("Cancelled", "cancelled")  # the reason stays the service's
    assert err["cell_index"] == 1 and "time.sleep(seconds)" in err["source"], err
    marked_failed(done["output_path"], "time.sleep(seconds)")
    late = wait_run(gw, submit(gw, {"notebook": "sleepy.ipynb", "timeout_s": 10})["id"], timeout=90)
    assert late["state"] == "timed_out" and late["error"]["ename"] == "Timeout", late
    assert late["error"]["cell_index"] == 1, late
    marked_failed(late["output_path"], "time.sleep(seconds)")


# -- 3: the CLI ---------------------------------------------------------------------------------------------------


def test_the_cli_takes_parameters_as_yaml_and_files_merged_as_papermill_does(gw: Gateway, tmp_path: Path) -> None:
    pf = tmp_path / "p.yaml"
    pf.write_text("n: 1\nname: from the file\nday: 2024-01-02\nitems: [1, two]\n")
    r = bkg(gw, "jobs", "run", "params.ipynb", "-f", str(pf), "-y", "n: 4\nname: from yaml", "-p", "name", "7")
    assert r.returncode == 0, r.stderr
    done = wait_run(gw, r.stdout.split()[0])
    want = {"n": 4, "name": "7", "day": "2024-01-02", "items": [1, "two"]}  # -p wins, then -y, then -f
    assert done["parameters"] == want and json.loads(printed(done["output_path"])) == want
    js = tmp_path / "p.json"
    js.write_text('{"n": 6}')
    r = bkg(gw, "jobs", "run", "params.ipynb", "--parameters-file", str(js), "-y", '{"name": "json"}', "--detach")
    assert r.returncode == 0, r.stderr
    assert wait_run(gw, r.stdout.strip())["parameters"] == {"n": 6, "name": "json"}
    for bad, word in ((["-y", "n: [1"], "-y"), (["-y", "- 1"], "-y"), (["-f", str(tmp_path / "none.yaml")], "-f")):
        r = bkg(gw, "jobs", "run", "params.ipynb", *bad)
        one_line_error(r, word)
        assert "-p NAME VALUE" not in r.stderr, r.stderr
    r = bkg(gw, "jobs", "schedule", "params.ipynb", "0 3 * * *", "-y", "n: 9", "-p", "name", "s")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.split()[0]
    mine = next(s for s in gw.client().get("/api/jobs/schedules").json()["schedules"] if s["id"] == sid)
    assert mine["parameters"] == {"n": 9, "name": "s"}
    assert gw.client().delete(f"/api/jobs/schedules/{sid}").status_code == 204


def test_the_cli_writes_a_runs_output_notebook_or_its_page(gw: Gateway, tmp_path: Path) -> None:
    done = wait_run(gw, submit(gw, {"notebook": "params.ipynb", "parameters": {"n": 11}})["id"])
    r = bkg(gw, "jobs", "output", done["id"])
    assert r.returncode == 0, r.stderr
    nb = nbformat.reads(r.stdout, as_version=4)
    assert '"n": 11' in "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    r = bkg(gw, "jobs", "output", done["id"], "--html", "-o", str(tmp_path / "page.html"))
    assert r.returncode == 0 and r.stdout == "", r.stderr
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert "<html" in page.lower() and '{"n": 11, "name": "x"' in page, page[-3000:]
    r = bkg(gw, "jobs", "output", done["id"], "-o", str(tmp_path / "out.ipynb"))
    assert r.returncode == 0 and nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
    one_line_error(bkg(gw, "jobs", "output", "run_nosuch"), "run_nosuch")
    one_line_error(bkg(gw, "jobs", "output", done["id"], "-o", str(tmp_path / "no" / "dir" / "x.ipynb")), "-o")
