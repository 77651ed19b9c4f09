"""Byte-reproducible safetensors files: the same tensors and metadata always give the same bytes.

``safetensors`` keeps a file's metadata in a hash map, so its keys come out in a different order from one
process to the next, and two runs that computed identical tensors write files with different sha256 (users
hash run artefacts). :func:`save_safetensors` lets ``safetensors.torch.save`` do the serialisation (dtype names,
byte order, validation) and then rewrites the result canonically: the tensors' data sorted by element size
(largest first, so every tensor stays aligned for zero-copy reads, as safetensors itself lays them out) then
name, and the JSON header with ``__metadata__`` first, its keys sorted, then the tensors sorted by name, compact
separators, padded with spaces to a multiple of 8 bytes as the format asks. The format is an 8-byte
little-endian header length, the JSON header, then the data; readers find each tensor by its offsets, so the
rewritten file loads exactly like the original. Hand-written because no safetensors API orders the header.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save

__all__ = ["canonical_safetensors", "save_safetensors"]


def canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The canonical bytes of a safetensors file holding ``tensors`` and ``metadata`` (see the module doc)."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    raw = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=meta or None)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    out_header: dict[str, object] = {}
    if meta:
        out_header["__metadata__"] = dict(sorted(meta.items()))
    names = sorted(k for k in header if k != "__metadata__")
    chunks: list[bytes] = []
    offsets: dict[str, list[int]] = {}
    offset = 0
    for name in sorted(names, key=lambda k: (-tensors[k].element_size(), k)):
        begin, end = header[name]["data_offsets"]
        chunks.append(bytes(data[begin:end]))
        offsets[name] = [offset, offset + end - begin]
        offset += end - begin
    for name in names:
        info = header[name]
        out_header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": offsets[name]}
    blob = json.dumps(out_header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` and ``metadata`` canonically to ``path``, atomically (temporary sibling, then rename)."""
    path = Path(path)
    blob = canonical_safetensors(tensors, metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
