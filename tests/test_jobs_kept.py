"""The files a run keeps, as jupyter-scheduler keeps a job's output files: what a notebook writes into its run's
folder (`bkg_kernel.jobs.kept.run_files()`, `BKG_RUN_FILES`) is listed and fetched with the run (REST, the notebook
client, the CLI, the jobs page), under the rule of its output notebook, and goes when the run is deleted. A run's
folder is its own (two runs of one notebook keep two files); a link it leaves there (to the admin key) or a hard
link is never served. Real gateway, real job workers and kernels, a real Dask LocalCluster for the cluster path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, Gateway, start_gateway, submit, wait_run
from helpers import button, dropdown, notebook, text

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
    notebook(folder / "swaps.ipynb", "n = 1", (  # its folder replaced by a link to the data dir
        "import os, shutil\nfrom bkg_kernel.jobs.kept import run_files\nout = run_files()\nshutil.rmtree(out)\n"
        "os.symlink(os.environ['BKG_DATA_DIR'], out)"))  # fmt: skip
    notebook(folder / "deep.ipynb", "n = 1", (  # a tree deeper than Python's recursion limit
        "import os\nfrom bkg_kernel.jobs.kept import run_files\nos.chdir(run_files())\n"
        "for _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\nopen('bottom.txt', 'w').write('x')\n"
        "os.chdir(run_files())\nopen('top.txt', 'w').write('top')"))  # fmt: skip
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
    written = subprocess.run([*cli, "report.csv", "-o", str(tmp_path / "r.csv")], capture_output=True, env=env)
    assert written.returncode == 0 and (tmp_path / "r.csv").read_bytes() == b"n,1\n", written
    nameless = subprocess.run([*cli, "-o", str(tmp_path / "all")], capture_output=True, text=True, env=env)
    assert nameless.returncode == 2 and "-o" in nameless.stderr and not (tmp_path / "all").exists(), nameless

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


def test_a_run_folder_swapped_for_a_link_or_a_deep_tree_serves_nothing_else_and_still_goes(gw: Gateway) -> None:
    """Found by a review: a notebook that put a link to the data dir in its folder's place had the data dir listed
    and served (its keys); a tree 1,100 folders deep made the listing and the run's deletion fail (recursion), the
    run's row gone and its folder left behind."""
    c = gw.client()
    swapped = wait_run(gw, submit(gw, {"notebook": "swaps.ipynb"})["id"])
    assert swapped["state"] == "succeeded", swapped
    assert _names(gw, swapped["id"]) == []
    for name in ("workbench.key", "admin.key", "bkg.duckdb"):
        assert c.get(f"/api/jobs/{swapped['id']}/files/{name}").status_code == 404
    assert c.delete(f"/api/jobs/{swapped['id']}").status_code == 204
    assert (gw.data_dir / "bkg.duckdb").is_file(), "deleting the run followed the link into the data dir"

    deep = wait_run(gw, submit(gw, {"notebook": "deep.ipynb"})["id"])
    assert deep["state"] == "succeeded", deep
    assert _names(gw, deep["id"]) == ["top.txt"]  # the listing stops 32 folders down, and answers
    assert c.get(f"/api/jobs/{deep['id']}/files/top.txt").text == "top"
    assert c.delete(f"/api/jobs/{deep['id']}").status_code == 204
    assert not list((gw.data_dir / "runs").glob(f"{deep['id']}*")), "the deep tree stayed behind"


def test_a_kept_file_is_read_from_what_was_checked_never_through_a_link(tmp_path: Path) -> None:
    """Found by a review: the file was checked by its path, then opened by its path again to be sent, so a link
    swapped in between was followed (the data dir's files served), and a FIFO swapped in held a gateway thread
    forever. Each part is now opened without following links, the file checked as opened, and sent from there."""
    from bkg_kernel.jobs import kept

    folder = tmp_path / "run.files"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("mine")
    (folder / "sub" / "b.txt").write_text("deeper")
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    f, st = kept.open_kept(folder, "a.txt")
    (folder / "a.txt").unlink()
    (folder / "a.txt").symlink_to(secret)  # swapped after the check: what is sent is what was opened
    with f:
        assert f.read() == b"mine" and st.st_size == 4
    os.mkfifo(folder / "pipe")
    (folder / "linked").symlink_to(tmp_path)
    os.link(folder / "sub" / "b.txt", folder / "hard.txt")
    for name in ("a.txt", "pipe", "linked/secret.txt", "hard.txt", "sub", "sub/b.txt"):
        with pytest.raises(NotFound):
            kept.open_kept(folder, name)  # sub/b.txt: hard-linked too now
    assert [e["name"] for e in kept.listing(folder)] == []
    folder.rename(tmp_path / "moved")
    folder.symlink_to(tmp_path)  # the run's folder itself a link
    with pytest.raises(NotFound):
        kept.open_kept(folder, "secret.txt")
    assert kept.listing(folder) == []


def test_a_listing_holds_few_descriptors_open_and_a_worker_removes_a_deep_tree(tmp_path: Path) -> None:
    """Found by a review: the listing opened every folder as it found it (400 subfolders: 400 descriptors open,
    and past the process's limit files were left out without a word); on a Dask worker the run's temporary folder
    was removed by recursion, and a tree 1,500 deep lost the run's whole outcome (a RecursionError)."""
    import resource

    from bkg_kernel.jobs import cluster, kept

    folder = tmp_path / "run.files"
    for i in range(400):
        (folder / f"d{i:03}").mkdir(parents=True)
        (folder / f"d{i:03}" / "f.txt").write_text("x")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    opened = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 40, hard))
    try:
        found = kept.listing(folder)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(found) == 400 and found[0]["name"] == "d000/f.txt"

    with cluster._scratch() as tmp:  # noqa: SLF001
        here = deep = Path(tmp)
        for _ in range(1500):  # one at a time: os.makedirs recurses too
            deep = deep / "d"
            deep.mkdir()
    assert not here.exists()


def test_the_jobs_page_lists_a_runs_kept_files_and_shows_each(
    gw: Gateway, login: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jobs dashboard (and the panel in a notebook): `Files` lists the picked run's kept files; a file picked is
    shown (a CSV as a table, an SVG drawn, text as text) with a link that downloads its bytes; another user's key
    without the run's scopes gets the refusal, not a listing."""
    import base64
    import re

    from bkg_kernel.display import fmt_bytes
    from bkg_kernel.widgets import jobs as jobs_page
    from bkg_kernel.widgets import jobs_panel
    from bkg_kernel.widgets.jobs import PREVIEW_BYTES, kept_preview

    other = submit(gw, {"notebook": "writes.ipynb", "parameters": {"n": 8}})
    run = wait_run(gw, submit(gw, {"notebook": "writes.ipynb", "parameters": {"n": 7}})["id"])
    wait_run(gw, other["id"])
    panel = jobs_panel(login(ADMIN_KEY))
    picked, pick = dropdown(panel, "run"), dropdown(panel, "file")
    files, show = button(panel, "Files"), button(panel, "Show file")
    picked.value = run["id"]
    assert pick.options == () and show.disabled
    files.click()
    shown = text(panel)
    assert "Files this run kept (2)" in shown and "plots/a.svg" in shown and "key.txt" not in shown, shown
    assert list(pick.options) == ["plots/a.svg", "report.csv"] and not show.disabled  # no link served

    pick.value = "report.csv"
    show.click()
    shown = text(panel)
    assert re.search(r"<table class='bkg-table'><thead><tr><th[^>]*>n</th><th[^>]*>7</th>", shown), shown  # a table
    csv_b64 = base64.b64encode(b"n,7\n").decode()
    assert f"base64,{csv_b64}'>Download</a>" in shown
    pick.value = "plots/a.svg"
    show.click()
    assert f"<img src='data:image/svg+xml;base64,{base64.b64encode(b'<svg/>').decode()}'" in text(panel)
    # a file that grows after it was listed (a running run's log) is read no further than the page takes
    monkeypatch.setattr(jobs_page, "FETCH_MAX", 1000)
    (gw.data_dir / "runs" / f"{run['id']}.files" / "report.csv").write_text("n\n" + "7\n" * 5000)
    pick.value = "report.csv"
    show.click()
    shown = text(panel)
    assert "<code>report.csv</code> is more than this page fetches" in shown and "7\n7" not in shown, shown[:2000]

    picked.value = other["id"]  # another run: the file row goes until its files are listed
    assert pick.options == ()

    # what the page shows of bytes it cannot draw or show whole
    assert "<pre style='max-height:480px;overflow:auto'>mine &lt;3</pre>" in kept_preview("a.txt", b"mine <3")
    twice = kept_preview("t.csv", b"a,a,a (2)\n1,2,3\n")  # a column each, even under one name
    heads = "".join(f"<th[^>]*>{re.escape(h)}</th>" for h in ("a", "a (2)", "a (2) (3)"))
    assert re.search(heads + r".*<td[^>]*>1</td><td[^>]*>2</td><td[^>]*>3</td>", twice), twice
    binary = kept_preview("model.bin", b"\0\1\2" * 10)
    assert "binary" in binary and "Download" in binary and "<pre" not in binary
    long_text = kept_preview("log.txt", b"x" * (PREVIEW_BYTES + 10))
    assert f"its first {fmt_bytes(PREVIEW_BYTES)} of {fmt_bytes(PREVIEW_BYTES + 10)}" in long_text
    assert "x" * PREVIEW_BYTES in long_text and "x" * (PREVIEW_BYTES + 1) not in long_text

    # a key without the run's scopes: the refusal on the page, no listing
    narrow = gw.client().post("/admin/keys", json={"name": "panel-narrow", "scopes": ["plugins:read"]}).json()["key"]
    panel = jobs_panel(login(narrow))
    dropdown(panel, "run").value = run["id"]
    button(panel, "Files").click()
    shown = text(panel)
    assert "bkg-error" in shown and "Files this run kept" not in shown, shown
