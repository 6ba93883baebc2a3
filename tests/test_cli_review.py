"""What a review of the `bkg` command line found (each reproduced with real processes):

1. with the data dir's gateway down, the admin commands sent admin.key to whatever answered on BKG_PORT (anyone
   may bind 127.0.0.1:43119), and a non-bkg answer was a KeyError traceback;
2. `bkg run` and `bkg lab` gave JupyterLab, and so every lab kernel, the whole environment: BKG_ADMIN_KEY too;
3. `bkg run --admin` was ignored without a word when BKG_API_KEY was set, and said whose key the lab held from the
   flag, not from the key;
4. `bkg run` left the gateway it started running when it failed early (an invalid BKG_API_KEY);
5. `bkg lab` and `bkg dashboards` left their server running when they got a SIGTERM;
6. Voila on a taken port moved to another, and `bkg run` announced (and exported) the one it asked for;
7. ports out of range, port 0 for the Hub, a taken port and a file as the Hub's state dir were tracebacks, hangs
   or a wrong port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from gateway_harness import ADMIN_KEY, free_port, start_gateway, wait_for
from helpers import RecordingServer, recording_server

from bkg_kernel.errors import Unavailable

BKG = [sys.executable, "-m", "bkg_kernel.cli"]
KEY = "bkg_0123456789ab_" + "Q" * 40  # what the data dir's key files hold here
SECRETS = ("BKG_ADMIN_KEY", "JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")


def _as_a_gateway(path: str) -> tuple[int, Any]:
    """A /health-like answer, for every path."""
    return 200, {"status": "ok", "plugins": {}}


@pytest.fixture
def recorder() -> Iterator[RecordingServer]:
    """Not a bkg gateway: a server on 127.0.0.1 that answers 200 to everything and keeps what it was sent."""
    with recording_server(_as_a_gateway) as r:
        yield r


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BKG_", "JUPYTERHUB_", "JPY_"))}
    env.update(BKG_MODEL_DIR=str(tmp_path / "models"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    return env | extra


def _bkg(*args: str, cwd: Path, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return _run([*BKG, *args], cwd, env, timeout)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in a session of its own; one that outlives `timeout` is killed with all it started there."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout:.0f} s)"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert len(r.stderr.strip().splitlines()) == 1 and all(w in r.stderr for w in words), r.stderr[-3000:]


def _gateways_of(data: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "serve" in cmd and str(data) in cmd:
            found.append(proc)
    return found


def _stop(procs: list[psutil.Process]) -> None:
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for proc in alive:
        proc.kill()


def _workbench(tmp_path: Path) -> Path:
    """A bkg checkout's folders for `bkg run` (empty: no dashboard kernels to start, no notebooks)."""
    (tmp_path / "notebooks").mkdir(exist_ok=True)
    (tmp_path / "dash").mkdir(exist_ok=True)
    return tmp_path / "dash"


# -- 1 -------------------------------------------------------------------------------------------------------------


def test_the_cli_sends_the_data_dir_s_keys_to_no_other_server_on_the_default_port(
    tmp_path: Path, recorder: RecordingServer
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("admin.key", "workbench.key"):
        (data / name).write_text(KEY + "\n")
    (data / "gateway.json").write_text(json.dumps({"pid": 1, "url": recorder.url}))  # left by a gateway killed
    env = _env(tmp_path, BKG_PORT=str(recorder.port), BKG_DATA_DIR=str(data))
    said = f"error: no bkg gateway answers for data dir {data.resolve()} (none runs on it): start one with `bkg serve`"
    for args in (["users", "list"], ["keys", "create", "k"], ["status"], ["plugins", "stop", "x"], ["jobs", "list"]):
        r = _bkg(*args, cwd=tmp_path, env=env)
        _one_line(r, said)
    assert recorder.seen == []  # not a key, not even a /health


def test_connect_sends_the_data_dir_s_key_only_to_the_gateway_it_started(
    tmp_path: Path, recorder: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notebook's `bkg.connect()` with no gateway running starts one on BKG_PORT: with something else there, the
    one it started cannot bind, and connect() says so instead of handing the stranger the workbench key."""
    import bkg_kernel

    for name in [n for n in os.environ if n.startswith(("BKG_", "JUPYTERHUB_", "JPY_"))]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BKG_PORT", str(recorder.port))
    monkeypatch.setenv("BKG_MODEL_DIR", str(tmp_path / "models"))
    data = tmp_path / "data"
    try:
        with pytest.raises(Unavailable) as refused:
            bkg_kernel.connect(data_dir=data, timeout=90)
        assert "exited" in refused.value.message and "in use" in refused.value.message, refused.value.message
        assert recorder.seen == []
        with pytest.raises(Unavailable, match="none runs on it"):
            bkg_kernel.connect(data_dir=data, start=False)
        assert recorder.seen == []
    finally:
        leftover = _gateways_of(data)
        _stop(leftover)
    assert leftover == []


def test_an_answer_that_is_not_a_gateway_s_is_one_line(tmp_path: Path, recorder: RecordingServer) -> None:
    for args in (["users", "list"], ["keys", "list"], ["jobs", "list"]):
        r = _bkg(*args, "--url", recorder.url, cwd=tmp_path, env=_env(tmp_path, BKG_API_KEY=KEY))
        _one_line(r, f"error: {recorder.url} did not answer as a bkg gateway does")


# -- 2, 3, 4 -------------------------------------------------------------------------------------------------------


def test_the_lab_s_environment_names_its_key_and_holds_no_other_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from bkg_kernel.cli import dashboards_cmd, lab_cmd, lab_env

    for name in SECRETS:
        monkeypatch.setenv(name, "secret-" + name)
    monkeypatch.setenv("BKG_API_KEY", "the-user-s-own")
    monkeypatch.setenv("JUPYTERHUB_USER", "ana")
    env = lab_env("http://127.0.0.1:9", "bkg_workbench", "http://127.0.0.1:8866", Path("/srv/dash"))
    assert not [k for k in env if k in SECRETS or k.startswith("JUPYTERHUB_")], sorted(env)
    assert "secret-" not in json.dumps(env)
    assert env["BKG_API_KEY"] == "bkg_workbench" and env["BKG_GATEWAY_URL"] == "http://127.0.0.1:9"
    assert env["BKG_DASHBOARDS_URL"] == "http://127.0.0.1:8866" and env["BKG_DASHBOARDS_DIR"] == "/srv/dash"
    assert env["PATH"] == os.environ["PATH"]
    assert "BKG_API_KEY" not in lab_env()  # `bkg lab` names the user's key itself, when there is one
    assert "--ServerApp.port_retries=0" in lab_cmd(8888, Path("nb"), False)  # a taken port: an error, not another
    assert "--Voila.port_retries=0" in dashboards_cmd(8866, Path("dash"))


def test_bkg_run_says_whose_key_the_lab_holds_and_gives_it_no_other(tmp_path: Path) -> None:
    data = tmp_path / "data"
    g = start_gateway(data, plugins=["sysinfo"])
    proc: subprocess.Popen[bytes] | None = None
    try:
        admin = g.client()
        vera = admin.post("/admin/users", json={"username": "vera", "role": "viewer"}).json()
        key = admin.post("/admin/keys", json={"name": "vera's", "user_id": vera["id"]}).json()["key"]
        lab_port, dash_port = free_port(), free_port()
        env = _env(tmp_path, BKG_API_KEY=key, BKG_ADMIN_KEY=ADMIN_KEY, JUPYTERHUB_API_TOKEN="hub-secret",
                   BKG_DASHBOARDS_DIR=str(_workbench(tmp_path)), BKG_LAB_START_GATEWAY="0")  # fmt: skip
        refused = _bkg("run", "--admin", "--data-dir", str(data), cwd=tmp_path, env=env)
        _one_line(refused, "--admin", "BKG_API_KEY")  # --admin cannot give what BKG_API_KEY overrides
        log = tmp_path / "run.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([*BKG, "run", "--port", str(lab_port), "--dashboards-port", str(dash_port),
                                     "--data-dir", str(data)], cwd=tmp_path, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        line = wait_for(lambda: next((x for x in log.read_text().splitlines() if "the lab and its" in x), None), 90)
        assert "act as 'vera' with no admin rights (BKG_API_KEY)" in line, log.read_text()

        def lab() -> psutil.Process | None:
            kids = psutil.Process(proc.pid).children(recursive=True)
            return next((c for c in kids if "jupyterlab" in " ".join(c.cmdline())), None)

        environ = wait_for(lab, 60).environ()
        assert environ["BKG_API_KEY"] == key and environ["BKG_GATEWAY_URL"] == g.url
        assert environ["BKG_DASHBOARDS_URL"] == f"http://127.0.0.1:{dash_port}"
        assert not [k for k in environ if k in SECRETS] and ADMIN_KEY not in json.dumps(environ), sorted(environ)
        proc.terminate()
        assert proc.wait(90) == 0
        assert "bkg gateway stopped" not in log.read_text()  # not the one it started: left running
        assert g.client().get("/health").status_code == 200
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        g.stop()


def test_bkg_run_stops_the_gateway_it_started_when_it_fails(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = _env(tmp_path, BKG_API_KEY="bkg_0123456789ab_" + "Z" * 40, BKG_PORT="0",
               BKG_DASHBOARDS_DIR=str(_workbench(tmp_path)))  # fmt: skip
    try:
        r = _bkg("run", "--port", str(free_port()), "--dashboards-port", str(free_port()), "--data-dir", str(data),
                 cwd=tmp_path, env=env, timeout=120)  # fmt: skip
        assert r.returncode == 2 and "error: invalid API key" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "bkg gateway stopped" in r.stderr
        wait_for(lambda: not _gateways_of(data), 60)
    finally:
        _stop(_gateways_of(data))


# -- 5 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["lab", "dashboards"])
def test_lab_and_dashboards_stop_their_server_on_sigterm(server: str, tmp_path: Path) -> None:
    folder = _workbench(tmp_path)
    args = ["--notebook-dir", str(tmp_path / "notebooks")] if server == "lab" else ["--folder", str(folder)]
    env = _env(tmp_path, BKG_API_KEY=KEY, BKG_ADMIN_KEY=ADMIN_KEY, JUPYTERHUB_API_TOKEN="hub-secret",
               BKG_LAB_START_GATEWAY="0", BKG_DATA_DIR=str(tmp_path / "data"))  # fmt: skip
    marker = "jupyterlab" if server == "lab" else "voila"
    proc = subprocess.Popen([*BKG, server, "--port", str(free_port()), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    found: list[psutil.Process] = []
    try:

        def started() -> psutil.Process | None:
            top = psutil.Process(proc.pid)
            return next((p for p in [top, *top.children(True)] if marker in " ".join(p.cmdline()[:3])), None)

        found.append(wait_for(started, 60))
        environ = found[0].environ()
        assert not [k for k in environ if k in SECRETS] and ADMIN_KEY not in json.dumps(environ), sorted(environ)
        if server == "lab":
            assert environ["BKG_API_KEY"] == KEY  # the user's own key, named for the lab
        proc.terminate()  # a service manager's SIGTERM, to the process it started
        proc.wait(60)
        assert not psutil.wait_procs(found, timeout=30)[1], "the server outlived `bkg` stopped by SIGTERM"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _stop([p for p in found if p.is_running()])


# -- 6, 7 ----------------------------------------------------------------------------------------------------------


def test_ports_and_the_hub_s_state_dir_are_checked_before_anything_starts(tmp_path: Path) -> None:
    dash = _workbench(tmp_path)
    data, hub_data = tmp_path / "data", tmp_path / "hub-data"
    env = _env(tmp_path, BKG_DASHBOARDS_DIR=str(dash), BKG_DATA_DIR=str(data))
    try:
        for args, option in [
            (["hub", "--port", "0"], "'--port'"),
            (["hub", "--port", "70000"], "'--port'"),
            (["lab", "--port", "70000"], "'--port'"),
            (["dashboards", "--port", "0"], "'--port'"),
            (["run", "--port", "70000"], "'--port'"),
            (["run", "--dashboards-port", "0"], "'--dashboards-port'"),
        ]:
            r = _bkg(*args, cwd=tmp_path, env=env, timeout=60)
            assert r.returncode == 2 and option in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = str(taken.getsockname()[1])
            hub = ["--data-dir", str(hub_data), "--state-dir", str(tmp_path / "hub-state")]
            for args in (
                ["hub", "--port", port, *hub],
                ["lab", "--port", port, "--notebook-dir", str(tmp_path / "notebooks")],
                ["dashboards", "--port", port, "--folder", str(dash)],
                ["run", "--dashboards-port", port, "--port", str(free_port())],
                ["run", "--port", port, "--dashboards-port", str(free_port())],
            ):
                said = f"cannot listen on 127.0.0.1:{port}: the port is in use; choose another with --"
                _one_line(_bkg(*args, cwd=tmp_path, env=env, timeout=60), said)
        assert not hub_data.exists() and not (data / "gateway.json").exists() and not _gateways_of(data)
        (tmp_path / "a-file").write_text("")
        r = _bkg("hub", "--port", str(free_port()), "--data-dir", str(hub_data), "--state-dir", "a-file",
                 cwd=tmp_path, env=env, timeout=60)  # fmt: skip
        _one_line(r, "cannot use a-file as the Hub's state dir: a file is in the way of the folder")
        assert not hub_data.exists(), "a refused Hub made its data dir"  # checked before anything is made
        r = _bkg("hub", "--port", str(free_port()), "--data-dir", str(hub_data), "--state-dir", "a-file/under",
                 cwd=tmp_path, env=env, timeout=60)  # fmt: skip
        _one_line(r, "cannot use a-file/under as the Hub's state dir: a file is in the way of the folder")
        assert not hub_data.exists()
        (tmp_path / "dangling").symlink_to(tmp_path / "nothing-there")  # a link to nothing: mkdir refuses it
        r = _bkg("hub", "--port", str(free_port()), "--data-dir", str(hub_data), "--state-dir", "dangling",
                 cwd=tmp_path, env=env, timeout=60)  # fmt: skip
        _one_line(r, "cannot use dangling as the Hub's state dir: a file is in the way of the folder")
        assert not hub_data.exists()
    finally:
        _stop(_gateways_of(data) + _gateways_of(hub_data))


def test_the_shipped_hub_config_names_a_state_dir_it_cannot_make(tmp_path: Path) -> None:
    """`jupyterhub -f deploy/jupyterhub_config.py` with BKG_HUB_STATE_DIR a file: one line, no Hub started."""
    from bkg_kernel.hub import CONFIG

    (tmp_path / "a-file").write_text("")
    ports = {n: str(free_port()) for n in ("PORT", "HUB_PORT", "PROXY_API_PORT", "GATEWAY_PORT")}
    env = _env(tmp_path, BKG_HUB_STATE_DIR=str(tmp_path / "a-file"), BKG_HUB_DATA_DIR=str(tmp_path / "data"),
               **{f"BKG_HUB_{n}": p for n, p in ports.items()})  # fmt: skip
    r = _run([sys.executable, "-m", "jupyterhub", "-f", str(CONFIG)], tmp_path, env, 60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"cannot use {tmp_path / 'a-file'} as the Hub's state dir (BKG_HUB_STATE_DIR)" in r.stderr, r.stderr
