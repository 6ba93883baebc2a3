"""The extension's wheel installs where there is no Node, and JupyterLab then loads both halves of it.

A fresh venv gets the wheel that `scripts/bootstrap.sh` built (`pip install --no-deps`); its other packages
come from the project venv through a .pth file. `node`, `npm`, `jlpm` and `yarn` on PATH are stubs that fail,
so anything that reached for Node would break the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import httpx
from gateway_harness import http_ok, jupyter_url, wait_for

EXT = Path(__file__).resolve().parent.parent / "extensions" / "jupyterlab_bkg"


def test_wheel_installs_and_loads_without_node(tmp_path: Path) -> None:
    wheels = sorted((EXT / "dist-cached").glob("jupyterlab_bkg-*.whl"))
    assert wheels, (
        "scripts/bootstrap.sh builds the wheel into the cache and links extensions/jupyterlab_bkg/dist-cached"
    )
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for tool in ("node", "npm", "jlpm", "yarn", "npx"):
        (stubs / tool).write_text("#!/bin/sh\necho no node here >&2\nexit 127\n")
        (stubs / tool).chmod(0o755)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PATH": f"{stubs}:{venv / 'bin'}:/usr/bin:/bin", "JUPYTER_PLATFORM_DIRS": "1"}
    for var in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(var, None)
    py = str(venv / "bin" / "python")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--ignore-installed",
            "--prefix",
            str(venv),
            "-q",
            str(wheels[-1]),
        ],
        check=True,
        env=env,
    )
    assert (venv / "share/jupyter/labextensions/jupyterlab-bkg/package.json").is_file()
    assert list((venv / "share/jupyter/labextensions/jupyterlab-bkg/static").glob("remoteEntry.*.js"))

    def jupyter(module: str, *args: str) -> str:
        r = subprocess.run([py, "-m", module, *args], env=env, capture_output=True, text=True, timeout=120)
        return r.stdout + r.stderr

    labext = jupyter("jupyterlab.labextensions", "list")  # `jupyter labextension list`
    assert "jupyterlab-bkg v0.1.0" in labext and "enabled" in labext and "OK" in labext, labext
    assert str(venv) in labext  # the copy from this wheel, not the project venv's
    serverext = jupyter("jupyter_server", "extension", "list")  # `jupyter server extension list`
    assert "jupyterlab_bkg" in serverext and "OK" in serverext, serverext

    # the lab server started from this venv serves the prebuilt assets and the forwarding routes
    with open(tmp_path / "lab.log", "wb") as log:
        proc = subprocess.Popen(
            [py, "-m", "jupyterlab", "--no-browser", "--allow-root", "--port=0", "--ip=127.0.0.1",
             "--ServerApp.token=t", f"--ServerApp.root_dir={tmp_path}"],
            env={**env, "BKG_GATEWAY_URL": "http://127.0.0.1:9", "BKG_API_KEY": "x", "BKG_LAB_START_GATEWAY": "0"},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = jupyter_url(proc, tmp_path / "lab.log")
        wait_for(lambda: http_ok(f"{url}/api/status", token="t"), timeout=90, every=0.5)
        page = httpx.get(f"{url}/lab", params={"token": "t"}).text
        assert "jupyterlab-bkg" in page  # listed among the federated extensions the page loads
        entry = next((venv / "share/jupyter/labextensions/jupyterlab-bkg/static").glob("remoteEntry.*.js")).name
        r = httpx.get(f"{url}/lab/extensions/jupyterlab-bkg/static/{entry}", params={"token": "t"})
        assert r.status_code == 200 and len(r.content) > 1000
        # the server extension answers, and says plainly that no gateway runs at the configured URL
        r = httpx.get(f"{url}/bkg/api/api/plugins", params={"token": "t"})
        assert (
            r.status_code == 502
            and "cannot reach the bkg gateway at http://127.0.0.1:9" in r.json()["error"]["message"]
        )
    finally:
        proc.terminate()
        proc.wait(20)
