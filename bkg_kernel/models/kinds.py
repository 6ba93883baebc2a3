"""Check that a model file or folder is what its kind says, and read the facts the registry keeps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bkg_kernel.errors import CorruptData, InvalidInput, escaped
from bkg_kernel.models.gguf import read_gguf


@dataclass
class Inspected:
    """The kind a model turned out to be, its license when the file names one, and facts about it."""

    kind: str
    license: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def inspect(path: Path, kind: str | None = None) -> Inspected:
    """Detect (or check) the kind of `path`; raise `CorruptData` / `InvalidInput` naming the problem."""
    guessed = kind or _guess(path)
    if guessed in ("gguf-llm", "gguf-embedding"):
        return _gguf(path, kind)
    if guessed == "hf-transformers":
        return _hf(path)
    if guessed == "onnx":
        return _onnx(path)
    if guessed == "face-pack":
        return _face_pack(path)
    if guessed == "torch-program":
        return _torch_program(path)
    if guessed == "classifier":
        return _classifier(path)
    raise InvalidInput(
        f"cannot tell what kind of model {path.name} is: pass kind (gguf-llm, gguf-embedding, hf-transformers, "
        "onnx, face-pack, torch-program, classifier)",
        field="kind",
    )


def _guess(path: Path) -> str | None:
    if path.is_file():
        return {".gguf": "gguf-llm", ".onnx": "onnx", ".pt": "torch-program", ".pt2": "torch-program"}.get(
            path.suffix.lower()
        )
    if (path / "config.json").is_file():
        return "hf-transformers"
    if (path / "classifier.json").is_file():
        return "classifier"
    if any(path.glob("*.onnx")):
        return "face-pack"
    return None


def _gguf(path: Path, kind: str | None) -> Inspected:
    if not path.is_file():
        raise InvalidInput(f"{path} is a folder; a GGUF model is one file", field="path")
    info = read_gguf(path)
    actual = "gguf-embedding" if info.is_embedding else "gguf-llm"
    if kind == "gguf-embedding" and actual == "gguf-llm":
        actual = kind  # any decoder can embed (mean pooling); the user asked for it
    lic = info.metadata.get("general.license")
    return Inspected(actual, str(lic) if lic else None, info.summary())


def _hf(path: Path) -> Inspected:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CorruptData(f"{path.name} is not a transformers model folder (no config.json)", field="path")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CorruptData(f"{path.name}/config.json is not valid JSON: {exc}", field="path") from None
    weights = sorted(escaped(p.name) for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not weights:
        raise CorruptData(f"{path.name} has no weights (*.safetensors or *.bin)", field="path")
    sentence = (path / "modules.json").is_file()
    return Inspected(
        "hf-transformers",
        None,
        {
            "model_type": cfg.get("model_type"),
            "architectures": cfg.get("architectures"),
            "hidden_size": cfg.get("hidden_size"),
            "sentence_transformers": sentence,
            "weights": weights,
        },
    )


def _onnx(path: Path) -> Inspected:
    if not path.is_file():
        raise InvalidInput(
            f"{path} is a folder; an ONNX model is one file (a folder of them is a face-pack)", field="path"
        )
    with path.open("rb") as f:
        head = f.read(2)
    # an ONNX ModelProto starts with field 1 (ir_version, varint): byte 0x08
    if head[:1] != b"\x08":
        raise CorruptData(f"{path.name} is not an ONNX model (no ModelProto header)", field="path")
    return Inspected("onnx", None, {"bytes": path.stat().st_size})


def _face_pack(path: Path) -> Inspected:
    if not path.is_dir():
        raise InvalidInput(f"{path} is a file; a face pack is a folder of ONNX models", field="path")
    files = sorted(p.name for p in path.glob("*.onnx"))  # shown escaped (a name that is not UTF-8 is not JSON)
    if not files:
        raise CorruptData(f"{path.name} has no .onnx models (an insightface pack holds detection and recognition)")
    for name in files:
        _onnx(path / name)
    return Inspected("face-pack", None, {"models": [escaped(f) for f in files]})


def _torch_program(path: Path) -> Inspected:
    import zipfile

    if not path.is_file() or not zipfile.is_zipfile(path):
        raise CorruptData(
            f"{path.name} is not a TorchScript (.pt) or torch.export (.pt2) archive (not a zip file)", field="path"
        )
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    fmt = "torch.export" if any(n.endswith("archive_format") for n in names) or path.suffix == ".pt2" else "torchscript"
    if fmt == "torchscript" and not any("/code/" in n or n.endswith("constants.pkl") for n in names):
        raise CorruptData(f"{path.name} is a zip but not a TorchScript archive (no code/)", field="path")
    return Inspected("torch-program", None, {"format": fmt, "entries": len(names)})


def _classifier(path: Path) -> Inspected:
    from bkg_kernel.models.classifier import Classifier

    if not path.is_dir():
        raise InvalidInput(f"{path} is a file; a classifier is a folder (classifier.json + weights.npz)", field="path")
    clf = Classifier.load(path)  # raises CorruptData naming the problem
    keep = ("embed_model", "dim", "architecture", "collection", "label_field", "metrics")
    meta = {k: clf.info[k] for k in keep if k in clf.info}
    if isinstance(meta.get("metrics"), dict):
        kept = ("accuracy", "f1_macro", "test_examples", "labels_tested", "labels_total")  # f1_macro is over the tested
        meta["metrics"] = {k: v for k, v in meta["metrics"].items() if k in kept}
    return Inspected("classifier", None, {"labels": clf.labels, **meta})
