"""Reading LoRA safetensors files into low-rank modules with canonical layer names.

Only safetensors is read. Pickle-based files are refused before a single byte is unpickled: loading a
pickle runs arbitrary code, and LoRAs are routinely downloaded from strangers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_klora.errors import LoraFileError
from lib_klora.loras.naming import ParsedKey, align_text_encoder, detect_base_architecture, parse_lora_key

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_ALPHA_METADATA_KEYS = ("lora_alpha", "alpha", "ss_network_alpha")
_PEFT_METADATA_KEYS = (
    "lora_adapter_metadata",
    "unet_lora_adapter_metadata",
    "transformer_lora_adapter_metadata",
)


@dataclass
class LowRankModule:
    """One adapted layer of a LoRA: ΔW = scale · up @ (mid ∘) down."""

    canonical: str
    stem: str
    down: torch.Tensor  # (r, in) or conv (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or conv (out, r, 1, 1)
    mid: torch.Tensor | None = None  # LoCon CP core (r, r, kh, kw)
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha/rank as kohya and A1111 define it; 1 when the file stores no alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        """Flattened input size (in · kh · kw for convolutions)."""
        if self.mid is not None:
            return int(self.down.shape[1] * self.mid.shape[2] * self.mid.shape[3])
        return int(math.prod(self.down.shape[1:]))

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def factors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out, r), down (r, in)) in fp32 with alpha/rank folded into `up`, so ΔW = up @ down."""
        up = self.up.reshape(self.up.shape[0], -1).to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        if self.mid is not None:
            # CP/Tucker LoCon: fold the spatial core into the down factor -> (r, in·kh·kw).
            mid = self.mid.to(device=device, dtype=torch.float32)
            down = torch.einsum("abhw,bi->aihw", mid, down.reshape(down.shape[0], -1)).reshape(
                mid.shape[0], -1
            )
        else:
            down = down.reshape(down.shape[0], -1)
        if self.scale != 1.0:
            up = up * self.scale
        return up, down

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Dense effective ΔW as a 2-D fp32 matrix (out, in·kh·kw)."""
        up, down = self.factors(device)
        return up @ down


@dataclass
class LoraFile:
    path: Path
    sha256: str
    metadata: dict[str, str]
    modules: dict[str, LowRankModule]  # canonical name -> module
    architecture: str | None
    unsupported: dict[str, int] = field(default_factory=dict)  # tensor part -> count of keys skipped

    @property
    def name(self) -> str:
        return self.path.stem


def _fail(path: Path, message: str, key: str | None = None) -> LoraFileError:
    return LoraFileError(path, message, key)


def _parse_header(path: Path, data: bytes) -> tuple[dict, dict[str, str], int]:
    """Validate the safetensors header ourselves so truncation and corruption get precise messages."""
    if len(data) == 0:
        raise _fail(path, "the file is empty")
    if data[:2] == b"PK" or data[:1] == b"\x80":
        raise _fail(
            path, "this is a pickle/zip checkpoint, not safetensors; convert it to .safetensors first"
        )
    if len(data) < 8:
        raise _fail(path, f"the file is truncated ({len(data)} bytes; a safetensors header needs at least 8)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _HEADER_LIMIT or 8 + header_len > len(data):
        raise _fail(
            path,
            f"not a valid safetensors file or truncated: the header claims {header_len} bytes, "
            f"the file has {len(data)}",
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(path, "corrupt safetensors metadata (not a JSON object)")
    body = len(data) - 8 - header_len
    for key, info in header.items():
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _fail(path, "corrupt safetensors header entry", key) from None
        if end > body or start > end:
            raise _fail(
                path, f"the file is truncated: tensor data ends at byte {end}, only {body} present", key
            )
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + header_len


def _load_tensors(path: Path, data: bytes, header: dict, offset: int) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise _fail(path, f"unsupported tensor dtype {info.get('dtype')!r} for a LoRA weight", key)
        start, end = info["data_offsets"]
        shape = [int(s) for s in info.get("shape", [])]
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - start != expected:
            raise _fail(path, f"tensor byte size {end - start} does not match shape {shape}", key)
        raw = bytearray(memoryview(data)[offset + start : offset + end])
        tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[key] = tensor.reshape(shape)
    return tensors


def _metadata_alpha(metadata: Mapping[str, str]) -> float | None:
    """PEFT files keep alpha outside the tensors: a plain number or a JSON adapter config."""
    for key in _PEFT_METADATA_KEYS:
        if key in metadata:
            try:
                config = json.loads(metadata[key])
            except json.JSONDecodeError:
                continue
            if isinstance(config, dict) and isinstance(config.get("lora_alpha"), (int, float)):
                return float(config["lora_alpha"])
    for key in _ALPHA_METADATA_KEYS:
        try:
            return float(metadata[key])
        except (KeyError, ValueError):
            continue
    return None


def _group_modules(path: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> LoraFile:
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    stems: dict[str, str] = {}
    unsupported: dict[str, int] = {}
    for key, tensor in tensors.items():
        parsed: ParsedKey | None = parse_lora_key(key)
        if parsed is None:
            unsupported[key] = unsupported.get(key, 0) + 1
            continue
        if parsed.part not in ("down", "up", "mid", "alpha"):
            unsupported[parsed.part] = unsupported.get(parsed.part, 0) + 1
            continue
        slot = parts.setdefault(parsed.canonical, {})
        if parsed.part in slot:
            raise _fail(path, f"two keys give layer {parsed.canonical} a '{parsed.part}' weight", key)
        slot[parsed.part] = (key, tensor)
        stems.setdefault(parsed.canonical, parsed.stem)
    default_alpha = _metadata_alpha(metadata)
    modules: dict[str, LowRankModule] = {}
    for canonical, slot in parts.items():
        modules[canonical] = _build_module(path, canonical, stems[canonical], slot, default_alpha)
    if not modules:
        found = ", ".join(sorted(unsupported)[:5]) or "no tensors"
        raise _fail(path, f"no LoRA (up/down) modules found; saw {found}")
    in_features = {name: int(m.down.shape[1]) for name, m in modules.items()}
    architecture = detect_base_architecture(in_features, dict(metadata))
    # diffusers' "text_encoder" is SDXL's first encoder (kohya "te1"); only the architecture tells.
    aligned = {align_text_encoder(name, architecture): m for name, m in modules.items()}
    for name, module in aligned.items():
        module.canonical = name
    return LoraFile(
        path=path,
        sha256="",
        metadata=dict(metadata),
        modules=aligned,
        architecture=architecture,
        unsupported=unsupported,
    )


def _build_module(
    path: Path,
    canonical: str,
    stem: str,
    slot: dict[str, tuple[str, torch.Tensor]],
    default_alpha: float | None,
) -> LowRankModule:
    if "up" not in slot or "down" not in slot:
        have, missing = ("up", "down") if "up" in slot else ("down", "up")
        key = slot[have][0] if have in slot else next(iter(slot.values()))[0]
        raise _fail(path, f"layer has no '{missing}' weight to go with its other LoRA tensors", key)
    down_key, down = slot["down"]
    up_key, up = slot["up"]
    mid = slot["mid"][1] if "mid" in slot else None
    for key, tensor in ((down_key, down), (up_key, up), *([slot["mid"]] if mid is not None else [])):
        if tensor.dim() not in (2, 4):
            raise _fail(path, f"expected a 2-D or 4-D LoRA weight, got shape {tuple(tensor.shape)}", key)
        if not torch.isfinite(tensor).all():
            raise _fail(path, "weight contains NaN or Inf values", key)
    rank = down.shape[0]
    up_rank = up.shape[1]
    if mid is not None:
        if mid.dim() != 4 or mid.shape[0] != up_rank or mid.shape[1] != rank:
            raise _fail(path, f"lora_mid shape {tuple(mid.shape)} does not fit up/down ranks", slot["mid"][0])
    elif up_rank != rank:
        raise _fail(
            path,
            f"shape mismatch: up {tuple(up.shape)} has rank {up_rank}, "
            f"down {tuple(down.shape)} has rank {rank}",
            up_key,
        )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise _fail(path, f"conv lora_up must be 1x1, got {tuple(up.shape)}", up_key)
    alpha = default_alpha
    if "alpha" in slot:
        alpha_key, alpha_tensor = slot["alpha"]
        if alpha_tensor.numel() != 1 or not torch.isfinite(alpha_tensor).all():
            raise _fail(path, "alpha must be one finite number", alpha_key)
        alpha = float(alpha_tensor.reshape(()).item())
    return LowRankModule(canonical=canonical, stem=stem, down=down, up=up, mid=mid, alpha=alpha)


def _file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_lora_file(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA safetensors file. Every problem raises `LoraFileError` naming the file (and key)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _fail(
            path,
            f"'{path.suffix}' files are pickles and are never loaded (unpickling can run arbitrary code); "
            "use the .safetensors version of this LoRA",
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a LoRA file") from None
    except OSError as exc:
        raise _fail(path, f"cannot read the file ({exc.strerror or exc})") from None
    header, metadata, offset = _parse_header(path, data)
    tensors = _load_tensors(path, data, header, offset)
    lora = _group_modules(path, tensors, metadata)
    lora.sha256 = _file_sha256(data)
    return lora
