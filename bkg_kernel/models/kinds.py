"""Check that a model file or folder is what its kind says, and read the facts the registry keeps."""

from __future__ import annotations

import json
import struct
import zipfile
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
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptData(f"{path.name}/config.json is not valid JSON: {exc}", field="path") from None
    if not isinstance(cfg, dict):
        raise CorruptData(
            f"{path.name}/config.json holds a JSON {type(cfg).__name__}, not an object of settings", field="path"
        )
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file())
    if not files:
        raise CorruptData(f"{path.name} has no weights (*.safetensors or *.bin)", field="path")
    for f in files:  # a header is a few bytes: what transformers would refuse at the first load is refused now
        if f.suffix == ".safetensors":
            _safetensors(f)
        # transformers' torch.save weights and a quantized model's (candle's); another .bin may be another runtime's
        elif f.name.startswith("pytorch_model") or f.name == "state_dict.pt":
            _torch_pickle(f)
    weights = [escaped(p.name) for p in files]
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


SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own bound on a header


def _safetensors(path: Path) -> None:
    """Check a .safetensors file's header: an 8-byte little-endian length, then that many bytes of a JSON object
    whose tensors lie within the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, SAFETENSORS_MAX_HEADER):
            raise CorruptData(
                f"{path.parent.name}/{path.name} is not a safetensors file (its header length {n:,} does not fit "
                f"its {size:,} bytes)",
                field="path",
            )
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise CorruptData(f"{path.parent.name}/{path.name} is not a safetensors file (no JSON header)", field="path")
    ends = [
        t["data_offsets"][1]
        for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)
        and len(t["data_offsets"]) == 2 and isinstance(t["data_offsets"][1], int)
    ]  # fmt: skip
    if len(ends) != len(header) - ("__metadata__" in header) or max(ends, default=0) > size - 8 - n:
        raise CorruptData(
            f"{path.parent.name}/{path.name} is a damaged safetensors file (its tensors lie outside its {size:,} "
            "bytes, or one has no data_offsets)",
            field="path",
        )


def _torch_pickle(path: Path) -> None:
    """Check a torch.save file (.bin, .pt, .pth): a zip archive, or a pickle (torch's format before 1.6)."""
    with path.open("rb") as f:
        head = f.read(1)
    if head != b"\x80" and not zipfile.is_zipfile(path):
        raise CorruptData(
            f"{path.parent.name}/{path.name} is not a torch.save file (neither a zip archive nor a pickle)",
            field="path",
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
    if not path.is_file() or not zipfile.is_zipfile(path):
        raise CorruptData(
            f"{path.name} is not a TorchScript (.pt) or torch.export (.pt2) archive (not a zip file)", field="path"
        )
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CorruptData(f"{path.name} is a damaged zip archive: {exc}", field="path") from None
    fmt = "torch.export" if any(n.endswith("archive_format") for n in names) or path.suffix == ".pt2" else "torchscript"
    if fmt == "torchscript":
        # torch.jit.save writes <name>/data.pkl (the module), <name>/code/ (its TorchScript) and <name>/version
        missing = [
            part
            for part, found in (
                ("code/", any("/code/" in n for n in names)),
                ("data.pkl", any(n.endswith("/data.pkl") for n in names)),
                ("version", any(n.endswith("/version") for n in names)),
            )
            if not found
        ]
        if missing:
            raise CorruptData(
                f"{path.name} is a zip but not a TorchScript archive (no {', '.join(missing)})", field="path"
            )
    elif not any(n.endswith("archive_format") for n in names):
        raise CorruptData(f"{path.name} is a zip but not a torch.export archive (no archive_format)", field="path")
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
