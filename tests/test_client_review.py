"""Found by a review of the notebook client and the CLI, each against the real thing: a gateway on 127.0.0.1 with
sysinfo and notebook jobs, the `bkg` CLI in a subprocess, a real kernel running the shipped store notebook."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import psutil
import pytest
from gateway_harness import ADMIN_KEY, Gateway, free_port, start_gateway
from helpers import notebook

from bkg_kernel.client import Workbench, connect
from bkg_kernel.errors import BkgError, InvalidInput, JobFailed, Timeout, Unavailable

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    roots = tmp_path_factory.mktemp("roots")
    notebook(roots / "ok.ipynb", "n = 1", "print('result', n * 2)")
    notebook(roots / "fails.ipynb", "n = 1", "raise ValueError(f'boom {n}')")
    notebook(roots / "sleepy.ipynb", "seconds = 60.0", "import time\ntime.sleep(seconds)")
    g = start_gateway(tmp_path_factory.mktemp("review") / "data", env={"BKG_JOB_ROOTS": str(roots)},
                      plugins=["sysinfo"])  # fmt: skip
    yield g
    g.stop()


def _gateways_of(data_dir: Path) -> list[psutil.Process]:
    """`bkg serve` processes on `data_dir` (a gateway some code started for it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "serve" in cmd and str(data_dir) in cmd:
            found.append(proc)
    return found


def _stop_gateways_of(data_dir: Path) -> list[int]:
    """Stop every gateway started on `data_dir`; return their pids (none is what the tests expect)."""
    procs = _gateways_of(data_dir)
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        proc.kill()
    return [p.pid for p in procs]


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BKG_", "JUPYTERHUB_"))}
    env.update(BKG_DATA_DIR=str(tmp_path / "data"), BKG_MODEL_DIR=str(tmp_path / "models"), BKG_PORT=str(free_port()))
    env.update(extra)
    return env


def _bkg(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bkg_kernel.cli", *args], cwd=tmp_path, env=_cli_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=180)  # fmt: skip


# -- 1: `bkg jobs ...` with no gateway ------------------------------------------------------------------------------


def test_bkg_jobs_does_not_start_a_gateway(tmp_path: Path) -> None:
    """`bkg jobs list` with no gateway started a detached one (at an explicit --url too); every other gateway
    command says none answers and exits 2."""
    data = tmp_path / "data"
    url = f"http://127.0.0.1:{free_port()}"
    try:
        r = _bkg(tmp_path, "jobs", "list", "--url", url, "--data-dir", str(data))
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-2000:])
        assert f"error: no bkg gateway answers at {url}" in r.stderr and "Traceback" not in r.stderr
        r = _bkg(tmp_path, "jobs", "schedules", "--data-dir", str(data))
        assert r.returncode == 2 and "no bkg gateway answers" in r.stderr, r.stderr[-2000:]
    finally:
        assert _stop_gateways_of(data) == [], "a gateway was started"


def test_another_server_at_the_url_is_named_as_such_not_as_no_gateway(tmp_path: Path) -> None:
    """Found by a review: a URL where another HTTP server answers (a static file server's 404 for /health) read
    "no bkg gateway answers at ...", as if nothing listened there: the URL is the likely mistake."""
    import http.server
    import threading

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    data = tmp_path / "data"
    try:
        r = _bkg(tmp_path, "jobs", "list", "--url", url, "--data-dir", str(data))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"error: {url} answers, but not as a bkg gateway (GET /health: HTTP 404)" in r.stderr, r.stderr
        with pytest.raises(Unavailable, match="answers, but not as a bkg gateway"):
            connect(url, data_dir=data, start=False)
    finally:
        srv.shutdown()
        srv.server_close()
        assert _stop_gateways_of(data) == []

    class Proxy(http.server.BaseHTTPRequestHandler):  # a proxy whose gateway is down (the Hub's, nginx)
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        with pytest.raises(Unavailable) as down:
            connect(url, data_dir=data, start=False)
        assert down.value.message == f"no bkg gateway answers at {url} (HTTP 503 from the server in front of it)"
    finally:
        srv.shutdown()
        srv.server_close()


# -- 2: connect() to another machine's gateway that is down ---------------------------------------------------------


def test_connect_starts_no_gateway_for_another_machine(tmp_path: Path) -> None:
    """connect() to a remote URL that did not answer started a local gateway bound to the remote address (and made
    a data dir with keys for it), which failed with a bind error."""
    data = tmp_path / "remote-data"
    url = f"http://192.0.2.1:{free_port()}"  # TEST-NET-1: nobody answers there
    try:
        with pytest.raises(Unavailable) as down:
            connect(url, data_dir=data, timeout=30)
        assert f"no bkg gateway answers at {url}" in down.value.message
        assert not data.exists()
    finally:
        assert _stop_gateways_of(data) == []


# -- 3: the client's call timeout -----------------------------------------------------------------------------------


def test_connect_passes_a_call_timeout_and_a_slow_call_is_a_timeout(gw: Gateway) -> None:
    """connect(timeout=...) only set the wait for a gateway it starts; every call waited 120 s, and one that
    outlived the client's wait was reported as a 503 "cannot reach the gateway" though the gateway was fine."""
    wb = connect(gw.url, api_key=ADMIN_KEY, call_timeout=1.0)
    assert wb.timeout == 1.0 and wb.call_port() is not None  # the plugin call goes over the call port
    for client in (wb, Workbench(gw.url, ADMIN_KEY, 1.0, call_port=False)):  # and over HTTP
        t0 = time.monotonic()
        with pytest.raises(Timeout) as slow:
            client.plugin("sysinfo").invoke("sysinfo.sleep", seconds=3)
        assert slow.value.status == 504 and time.monotonic() - t0 < 2.5
        assert "did not answer within 1s" in slow.value.message and "call_timeout" in slow.value.message
    patient = connect(gw.url, api_key=ADMIN_KEY)
    assert patient.timeout == 120.0 and "cpu_count" in patient.plugin("sysinfo").invoke("sysinfo.facts")
    with pytest.raises(Unavailable) as down:  # a gateway that is not there is still a 503
        Workbench(f"http://127.0.0.1:{free_port()}", ADMIN_KEY, 1.0).health()
    assert "cannot reach the bkg gateway" in down.value.message


# -- 4: wait_job on a notebook run ----------------------------------------------------------------------------------


def test_wait_job_waits_for_a_notebook_run(gw: Gateway) -> None:
    """`wb.wait_job('run-...')` (ids `wb.jobs()` lists) raised KeyError: 'result' once the run succeeded."""
    wb = connect(gw.url, api_key=ADMIN_KEY)
    run = wb.jobs.submit("ok.ipynb", {"n": 4})
    assert any(j["id"] == run["id"] for j in wb.jobs())
    done = wb.wait_job(run["id"], progress=False, timeout=120)
    assert done["id"] == run["id"] and done["state"] == "succeeded" and done["output_path"]
    failed = wb.jobs.submit("fails.ipynb")
    with pytest.raises(JobFailed) as err:
        wb.wait_job(failed["id"], progress=False, timeout=120)
    assert err.value.code == "job_failed" and "boom 1" in err.value.message


# -- 8: Ctrl-C during `bkg jobs run` --------------------------------------------------------------------------------


def test_ctrl_c_in_bkg_jobs_run_names_the_cli_command(gw: Gateway, tmp_path: Path) -> None:
    """Ctrl-C during `bkg jobs run` told a shell user `wb.jobs.cancel('run-...') stops it`."""
    cmd = [sys.executable, "-m", "bkg_kernel.cli", "jobs", "run", "sleepy.ipynb", "--url", gw.url]
    env = _cli_env(tmp_path, BKG_API_KEY=ADMIN_KEY)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = ""
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        assert run_id.startswith("run-"), run_id
        time.sleep(1.0)  # waiting now
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if run_id:
            connect(gw.url, api_key=ADMIN_KEY).jobs.cancel(run_id)
    assert f"`bkg jobs cancel {run_id}` stops it" in err and "wb.jobs" not in err, err[-1500:]


# -- 7: an unusable data dir ----------------------------------------------------------------------------------------


def test_an_unusable_data_dir_is_one_line_naming_it(tmp_path: Path) -> None:
    """A data dir that is a file (or under one) was a raw FileExistsError traceback from the CLI and from
    `bkg.connect(data_dir=...)`; the README promises one line and exit 2."""
    afile = tmp_path / "afile"
    afile.write_text("")
    for bad in (afile, afile / "sub"):
        r = _bkg(tmp_path, "store", "list", "--data-dir", str(bad))
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], r.stderr[-2000:]
    url = f"http://127.0.0.1:{free_port()}"
    try:
        with pytest.raises(BkgError) as bad_dir:
            connect(url, data_dir=afile, timeout=30)
        assert isinstance(bad_dir.value, InvalidInput) and bad_dir.value.field == "data_dir"
        assert str(afile) in bad_dir.value.message
    finally:
        assert _stop_gateways_of(afile) == []


# -- 9: small ones --------------------------------------------------------------------------------------------------


def test_faces_detect_of_a_missing_file_is_a_422_naming_image(gw: Gateway, tmp_path: Path) -> None:
    """A path that cannot be read was a raw FileNotFoundError (or IsADirectoryError)."""
    wb = connect(gw.url, api_key=ADMIN_KEY)
    for path in (tmp_path / "nope.jpg", tmp_path):
        with pytest.raises(InvalidInput) as bad:
            wb.faces.detect(str(path))
        assert bad.value.field == "image" and bad.value.status == 422 and str(path) in bad.value.message


def test_chat_magic_with_an_unclosed_quote_is_a_usage_error() -> None:
    """`%%chat --system "you are terse` was `ValueError: No closing quotation` from shlex."""
    from IPython.core.error import UsageError

    from bkg_kernel.client.magics import chat_magic

    with pytest.raises(UsageError) as bad:
        chat_magic('--system "you are terse', "hello")
    assert "No closing quotation" in str(bad.value) and "--system" in str(bad.value)


# -- 6: the store quickstart under `bkg run` ------------------------------------------------------------------------


def test_store_quickstart_runs_while_a_gateway_owns_the_data_dir(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Under `bkg run` the gateway owns the data dir the notebook opened with `Store(...)`: DataDirLocked in the
    first cell. Here this process holds the data dir, as a gateway would."""
    from nbclient import NotebookClient

    from bkg_kernel.store import Store

    data = tmp_path / "data"
    monkeypatch.setenv("BKG_DATA_DIR", str(data))
    nb = nbformat.read(ROOT / "notebooks" / "store_quickstart.ipynb", as_version=4)
    with Store(data):  # the owner
        client = NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}})  # fmt: skip
        client.execute()  # raises CellExecutionError on the first failing cell
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outs)
    assert (data / "quickstart-store" / "snapshots" / "quickstart").is_dir()
    assert any("2000" in o.get("data", {}).get("text/html", "") for o in outs)
