"""Reading a safetensors file safely: the header decides what the file is, bounds come before any work.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (an object, starting with
``{``), then the tensor bytes, contiguous, exactly as the header's ``data_offsets`` say. Whether a file *is*
safetensors is decided from that structure alone: a pickle or zip magic is only reported for a file whose
first bytes cannot start a safetensors header, so a valid file whose header length happens to begin with
0x80 (or spell ``PK``) is read like any other. Nothing here ever unpickles.

The header length is checked against the file's size and the format's own 100 MB limit after reading 8
bytes, so a huge or lying header is refused before anything else is read. The file is only read (opened
"rb"): it is never renamed or modified.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_klora.errors import LoraFileError

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header (MAX_HEADER_SIZE)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")

# Floating dtypes a LoRA weight may have. fp8 (FLUX LoRAs ship in it) is widened to bf16, which holds every
# e4m3/e5m2 value exactly and has the reductions (isfinite, abs, sum) that fp8 lacks on CPU.
_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_FP8_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Integer dtypes (a scalar alpha, as diffusers' kohya converter writes it): struct formats, read without
# torch's partial unsigned support. BOOL counts as an integer 0/1.
_INT_FORMATS = {"BOOL": "?", "U8": "B", "I8": "b", "U16": "H", "I16": "h", "U32": "I", "I32": "i"}
_INT_FORMATS.update({"U64": "Q", "I64": "q"})
_ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_ITEM_SIZES.update({name: struct.calcsize("<" + fmt) for name, fmt in _INT_FORMATS.items()})


@dataclass
class SafetensorsContents:
    header: dict[str, dict]  # tensor name -> {"dtype", "shape", "data_offsets"}, without __metadata__
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]  # floats as stored (fp8 widened to bf16), integers as int64/float64
    source_dtypes: dict[str, str]  # tensor name -> dtype as the file writes it
    sha256: str


def pickle_refusal(path: str | os.PathLike[str]) -> str:
    """The one message for a pickle LoRA, on every path (UI, API, tag, plan route, CLI)."""
    name = Path(path).name
    return (
        f"'{name}' is a pickle checkpoint (.pt/.ckpt/.bin or pickle/zip bytes), which K-LoRA never loads "
        "(unpickling can run arbitrary code); use the .safetensors version of this LoRA"
    )


def _fail(path: Path, message: str, key: str | None = None) -> LoraFileError:
    return LoraFileError(path, message, key)


def looks_like_pickle(first: bytes) -> bool:
    """Pickle protocol 2+ (0x80, protocol byte) or a zip archive (torch.save's default since 1.6)."""
    return (len(first) >= 2 and first[0] == 0x80 and 2 <= first[1] <= 5) or first[:4] == b"PK\x03\x04"


def plausible_header(first: bytes, file_size: int) -> bool:
    """Whether the first bytes can begin a safetensors file of this size: sane length, then ``{``."""
    if len(first) < 9:
        return False
    (length,) = struct.unpack("<Q", first[:8])
    return 2 <= length <= HEADER_LIMIT and 8 + length <= file_size and first[8:9] == b"{"


def _describe_failure(path: Path, first: bytes, file_size: int) -> LoraFileError:
    """Why a file whose first bytes are not a plausible safetensors header cannot be read."""
    if file_size == 0:
        return _fail(path, "the file is empty")
    if looks_like_pickle(first):
        return _fail(path, pickle_refusal(path))
    if file_size < 8:
        return _fail(
            path, f"the file is truncated ({file_size} bytes; a safetensors header needs at least 8)"
        )
    (length,) = struct.unpack("<Q", first[:8])
    if length > HEADER_LIMIT:
        return _fail(
            path,
            f"not a safetensors file: the header length field says {length} bytes, more than the format's "
            f"limit of {HEADER_LIMIT} (corrupt, or not a LoRA file)",
        )
    if 8 + length > file_size:
        return _fail(
            path,
            f"the file is truncated or not safetensors: the header claims {length} bytes, "
            f"the file has {file_size} in all",
        )
    return _fail(path, "not a safetensors file: the header is not a JSON object (it must start with '{')")


def _check_entry(path: Path, key: str, info: object) -> tuple[str, list[int], int, int]:
    if not isinstance(info, dict):
        raise _fail(path, "corrupt safetensors header entry (not an object)", key)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise _fail(path, "corrupt safetensors header entry (no dtype)", key)
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise _fail(path, f"corrupt safetensors header entry (shape {shape!r})", key)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _fail(path, f"corrupt safetensors header entry (data_offsets {offsets!r})", key)
    return dtype, shape, int(offsets[0]), int(offsets[1])


def _check_offsets(path: Path, header: dict[str, dict], body: int) -> None:
    """The tensors must tile the body exactly, in order, as safetensors itself requires."""
    entries = sorted(
        ((*_check_entry(path, key, info), key) for key, info in header.items()), key=lambda e: (e[2], e[3])
    )
    position = 0
    for dtype, shape, start, end, key in entries:
        if end > body:
            raise _fail(
                path, f"the file is truncated: tensor data ends at byte {end}, only {body} present", key
            )
        if start != position or end < start:
            raise _fail(
                path,
                f"inconsistent safetensors offsets: tensor data at {start}..{end}, expected {position}",
                key,
            )
        size = _ITEM_SIZES.get(dtype)
        if size is not None and end - start != math.prod(shape) * size:
            raise _fail(path, f"tensor byte size {end - start} does not match {dtype} shape {shape}", key)
        position = end
    if position != body:
        raise _fail(
            path, f"the file has {body - position} bytes after its last tensor (corrupt or truncated)"
        )


def _decode(path: Path, key: str, dtype: str, shape: list[int], raw: bytes) -> torch.Tensor:
    if dtype in _FLOAT_DTYPES:
        torch_dtype = _FLOAT_DTYPES[dtype]
        if not raw:
            return torch.empty(shape, dtype=torch_dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape)
    if dtype in _FP8_DTYPES:
        fp8 = getattr(torch, _FP8_DTYPES[dtype], None)
        if fp8 is None:
            raise _fail(path, f"{dtype} weights need torch 2.1 or newer", key)
        if not raw:
            return torch.empty(shape, dtype=torch.bfloat16)
        return torch.frombuffer(bytearray(raw), dtype=fp8).to(torch.bfloat16).reshape(shape)
    if dtype in _INT_FORMATS:
        fmt = _INT_FORMATS[dtype]
        values = struct.unpack(f"<{len(raw) // _ITEM_SIZES[dtype]}{fmt}", raw)
        as_float = dtype == "U64" and any(v >= 2**63 for v in values)
        return torch.tensor(values, dtype=torch.float64 if as_float else torch.int64).reshape(shape)
    raise _fail(path, f"unsupported tensor dtype {dtype!r} (not a number format safetensors defines)", key)


def read_safetensors(path: str | os.PathLike[str]) -> SafetensorsContents:
    """Read and check a safetensors file; every problem raises `LoraFileError` naming the file (and key)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _fail(path, pickle_refusal(path))
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            first = handle.read(9)
            if not plausible_header(first, size):
                raise _describe_failure(path, first, size)
            (length,) = struct.unpack("<Q", first[:8])
            text = first[8:] + handle.read(length - 1)
            header = _parse_json(path, text)
            metadata = header.pop("__metadata__", None) or {}
            if not isinstance(metadata, dict):
                raise _fail(path, "corrupt safetensors metadata (not a JSON object)")
            _check_offsets(path, header, size - 8 - length)
            body = handle.read()
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a LoRA file") from None
    except OSError as exc:
        raise _fail(path, f"cannot read the file ({exc.strerror or exc})") from None
    digest = hashlib.sha256(first[:8])
    digest.update(text)
    digest.update(body)
    tensors: dict[str, torch.Tensor] = {}
    dtypes: dict[str, str] = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        tensors[key] = _decode(path, key, info["dtype"], info["shape"], body[start:end])
        dtypes[key] = info["dtype"]
    return SafetensorsContents(
        header=header,
        metadata={str(k): str(v) for k, v in metadata.items()},
        tensors=tensors,
        source_dtypes=dtypes,
        sha256=digest.hexdigest(),
    )


def _parse_json(path: Path, text: bytes) -> dict:
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)")
    return header
