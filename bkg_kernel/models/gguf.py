"""Read a GGUF file's header (metadata and tensor table) and check that the file is whole.

Enough of the format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) to refuse a text file named
`.gguf` or a truncated download before llama.cpp is asked to load it, and to tell an LLM from an embedding
model. Large arrays (the tokenizer's vocabulary) are skipped, not decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from bkg_kernel.errors import CorruptData

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types: (elements per block, bytes per block); types missing here skip the size check.
_TYPE_SIZE = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}  # fmt: skip
EMBEDDING_ARCHS = {"bert", "nomic-bert", "jina-bert-v2", "t5encoder", "modern-bert", "neo-bert"}


@dataclass
class GGUFInfo:
    """What a GGUF header says about the model."""

    version: int
    metadata: dict[str, Any]
    n_tensors: int
    data_end: int | None  # where the last tensor ends; None when a tensor type is unknown here
    file_size: int
    arrays: dict[str, int] = field(default_factory=dict)  # array keys that were skipped, with their length

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str) -> Any:
        """Return `<architecture>.<key>` (e.g. `context_length`), or None."""
        return self.metadata.get(f"{self.architecture}.{key}")

    @property
    def is_embedding(self) -> bool:
        """An encoder architecture, or one that declares a pooling type: an embedding model."""
        return self.architecture in EMBEDDING_ARCHS or self.arch_value("pooling_type") not in (None, 0)

    def summary(self) -> dict[str, Any]:
        """Return the facts the registry keeps about the model."""
        return {
            "architecture": self.architecture,
            "name": self.metadata.get("general.name"),
            "context_length": self.arch_value("context_length"),
            "embedding_length": self.arch_value("embedding_length"),
            "block_count": self.arch_value("block_count"),
            "file_type": self.metadata.get("general.file_type"),
            "has_chat_template": "tokenizer.chat_template" in self.metadata,
            "vocab_size": self.arrays.get("tokenizer.ggml.tokens"),
            "gguf_version": self.version,
        }


class _Reader:
    def __init__(self, f: BinaryIO, size: int, path: Path) -> None:
        self.f, self.size, self.path = f, size, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise CorruptData(f"{self.path.name}: the GGUF header is truncated", field="path")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise CorruptData(f"{self.path.name}: a GGUF string claims {n} bytes", field="path")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        raise CorruptData(f"{self.path.name}: unknown GGUF value type {vtype}", field="path")

    def skip_array(self, etype: int, n: int) -> None:
        if etype in _SCALARS:
            self.f.seek(struct.calcsize(_SCALARS[etype]) * n, 1)
        elif etype == _STRING:
            for _ in range(n):
                self.f.seek(self.unpack("<Q"), 1)
        else:
            raise CorruptData(f"{self.path.name}: unsupported GGUF array type {etype}", field="path")


def read_gguf(path: Path, *, max_array: int = 64) -> GGUFInfo:
    """Parse the header of `path`; raise `CorruptData` naming what is wrong if it is not a whole GGUF file."""
    try:
        return _read_gguf(path, max_array)
    except (ArithmeticError, ValueError, struct.error) as exc:  # an alignment of 0, a count past any offset, ...
        raise CorruptData(f"{path.name}: the GGUF header is damaged ({exc})", field="path") from None


def _read_gguf(path: Path, max_array: int) -> GGUFInfo:
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise CorruptData(f"{path.name} is not a GGUF file (it does not start with the GGUF magic)", field="path")
        r = _Reader(f, size, path)
        version = r.unpack("<I")
        if version not in (2, 3):
            raise CorruptData(f"{path.name}: unsupported GGUF version {version}", field="path")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise CorruptData(f"{path.name}: the GGUF header is damaged (counts out of range)", field="path")
        meta: dict[str, Any] = {}
        arrays: dict[str, int] = {}
        for _ in range(n_kv):
            key, vtype = r.string(), r.unpack("<I")
            if vtype == _ARRAY:
                etype, n = r.unpack("<I"), r.unpack("<Q")
                if n <= max_array and etype in _SCALARS:
                    meta[key] = [r.value(etype) for _ in range(n)]
                else:
                    arrays[key] = n
                    r.skip_array(etype, n)
            else:
                meta[key] = r.value(vtype)
        end = 0
        known = True
        for _ in range(n_tensors):
            r.string()
            dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
            ttype, offset = r.unpack("<I"), r.unpack("<Q")
            if ttype not in _TYPE_SIZE:
                known = False
                continue
            per_block, block_bytes = _TYPE_SIZE[ttype]
            count = 1
            for d in dims:
                count *= d
            end = max(end, offset + count // per_block * block_bytes)
        align = int(meta.get("general.alignment", 32))
        if align <= 0:
            raise CorruptData(f"{path.name}: the GGUF alignment is {align}", field="path")
        start = -(-f.tell() // align) * align
    data_end = start + end if known else None
    if start > size or (data_end is not None and data_end > size):
        want = data_end if data_end is not None else start
        raise CorruptData(f"{path.name} is truncated: {size:,} bytes, the GGUF needs {want:,}", field="path")
    return GGUFInfo(version, meta, n_tensors, data_end, size, arrays)
