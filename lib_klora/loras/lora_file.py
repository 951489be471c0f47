"""Reading LoRA safetensors files into per-layer weight deltas with canonical layer names.

Only safetensors is read (`safetensors_header.py` decides from the header itself what a file is). Pickle-based
files are refused before a single byte is unpickled: loading a pickle runs arbitrary code, and LoRAs are
routinely downloaded from strangers. A layer is a plain low-rank pair (LoRA, LoCon with a CP core, DoRA), a
LyCORIS structured layer (LoHa, LoKr, full; `structured.py`), or, for FLUX files that split a fused layer,
row slices of it (`flux_names.py`).

DoRA: the ΔW a DoRA layer applies rescales each output row of W + ΔW_lora to a stored magnitude, which
needs the base model's weight; a file alone cannot give it. K-LoRA scores a DoRA layer by its low-rank
update scale · up @ down (the part the trainer learnt as a LoRA), with K from its rank, in the file reader
and in every host alike, and applies the host's exact DoRA delta while sampling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_klora.errors import LoraFileError
from lib_klora.loras.flux_names import bfl_name, slot_rows
from lib_klora.loras.naming import ParsedKey, align_text_encoder, detect_base_architecture, parse_lora_key
from lib_klora.loras.oft import OFT_PARTS, OftModule, OftShapeError
from lib_klora.loras.peft_metadata import AdapterSettings, adapter_settings
from lib_klora.loras.safetensors_header import PICKLE_SUFFIXES, pickle_refusal, read_safetensors
from lib_klora.loras.structured import (
    FORMAT_NAMES,
    STRUCTURED_PARTS,
    StructuredModule,
    StructureError,
    structured_kind,
)

__all__ = [
    "PICKLE_SUFFIXES",
    "LoraFile",
    "LowRankModule",
    "OftModule",
    "SlicedModule",
    "pickle_refusal",
    "read_lora_file",
]

_LOW_RANK_PARTS = ("down", "up", "mid")
_KNOWN_PARTS = {
    *_LOW_RANK_PARTS,
    "alpha",
    "dora_scale",
    *OFT_PARTS,
    *(p for parts in STRUCTURED_PARTS.values() for p in parts),
}
_UNREAD_FORMATS = {"oft_R": "BOFT", "boft_R": "BOFT"}  # names no host reads (A1111 reads oft_blocks/oft_diag)
_FLOAT_SOURCES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


@dataclass
class LowRankModule:
    """One adapted layer of a LoRA: ΔW = scale · up @ (mid ∘) down."""

    canonical: str
    stem: str
    down: torch.Tensor  # (r, in) or conv (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or conv (out, r, 1, 1)
    mid: torch.Tensor | None = None  # LoCon CP core (r, r, kh, kw)
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None  # DoRA magnitude (scored as described in the module docstring)

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
class SlicedModule:
    """A fused layer adapted in row slices (FLUX q/k/v/MLP written as separate layers); rows not covered
    stay zero. Its rank bound is the sum of the slices' ranks, as the hosts count a sliced patch."""

    canonical: str
    stem: str
    out_features: int
    in_features: int
    slices: list[tuple[int, LowRankModule | StructuredModule]]  # (first row, module)

    @property
    def rank(self) -> int:
        return sum(m.rank for _, m in self.slices)  # K is capped at the layer's size where it is used

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        out = torch.zeros(self.out_features, self.in_features, device=device, dtype=torch.float32)
        for start, module in self.slices:
            out[start : start + module.out_features] += module.delta(device)
        return out


LoraModule = LowRankModule | StructuredModule | SlicedModule | OftModule


@dataclass
class LoraFile:
    path: Path
    sha256: str
    metadata: dict[str, str]
    modules: dict[str, LoraModule]  # canonical name -> module
    architecture: str | None
    unsupported: dict[str, int] = field(default_factory=dict)  # tensor part -> count of keys skipped

    @property
    def name(self) -> str:
        return self.path.stem


def _fail(path: Path, message: str, key: str | None = None) -> LoraFileError:
    return LoraFileError(path, message, key)


Slot = dict[str, tuple[str, torch.Tensor]]  # part -> (key as written, tensor)


def _check_weight(path: Path, key: str, tensor: torch.Tensor, dtypes: Mapping[str, str], what: str) -> None:
    if dtypes.get(key, "F32") not in _FLOAT_SOURCES:
        raise _fail(
            path, f"{what} is stored as {dtypes[key]}; a LoRA weight must be a floating-point tensor", key
        )
    if tensor.numel() and not torch.isfinite(tensor).all():
        raise _fail(path, f"{what} contains NaN or Inf values", key)


def _alpha(path: Path, slot: Slot, stem: str, rank: int, settings: AdapterSettings) -> float | None:
    if "alpha" not in slot:
        return settings.alpha_for(stem, rank)
    key, tensor = slot["alpha"]
    if tensor.numel() != 1:
        raise _fail(path, f"alpha must be one number, got shape {tuple(tensor.shape)}", key)
    value = float(tensor.reshape(()).item())
    if not math.isfinite(value):
        raise _fail(path, "alpha must be one finite number", key)
    return value


def _check_dora(path: Path, slot: Slot, out_features: int, in_features: int, fmt: str) -> torch.Tensor | None:
    if "dora_scale" not in slot:
        return None
    key, magnitude = slot["dora_scale"]
    _check_weight(path, key, magnitude, {}, f"{fmt} DoRA magnitude")
    if magnitude.numel() not in (out_features, in_features):
        raise _fail(
            path,
            f"{fmt} DoRA magnitude has {magnitude.numel()} entries; the layer has {out_features} outputs "
            f"and {in_features} inputs",
            key,
        )
    return magnitude


def _part_name(key: str, stem: str) -> str:
    return key[len(stem) + 1 :] if key.startswith(stem + ".") else key


def _build_low_rank(
    path: Path, canonical: str, stem: str, slot: Slot, settings: AdapterSettings, dtypes: Mapping[str, str]
) -> LowRankModule:
    if "up" not in slot or "down" not in slot:
        have, missing = ("up", "down") if "up" in slot else ("down", "up")
        if have not in slot:  # only mid/alpha/dora_scale: name what is there
            key = next(iter(slot.values()))[0]
            raise _fail(path, f"LoRA layer {stem} has {_part_name(key, stem)} but no up/down weights", key)
        key = slot[have][0]
        present = _part_name(key, stem)
        pairs = (("lora_down", "lora_up"), ("lora_A", "lora_B"), ("down", "up"))
        wanted = next(
            (
                present.replace(*(pair if have == "down" else pair[::-1]), 1)
                for pair in pairs
                if have in present
            ),
            missing,
        )
        raise _fail(path, f"LoRA layer {stem} has {present} but no {wanted}", key)
    down_key, down = slot["down"]
    up_key, up = slot["up"]
    mid = slot["mid"][1] if "mid" in slot else None
    for key, tensor in ((down_key, down), (up_key, up), *([slot["mid"]] if mid is not None else [])):
        if tensor.dim() not in (2, 4):
            raise _fail(path, f"expected a 2-D or 4-D LoRA weight, got shape {tuple(tensor.shape)}", key)
        _check_weight(path, key, tensor, dtypes, "LoRA weight")
    rank = down.shape[0]
    up_rank = up.shape[1]
    if mid is not None:
        if mid.dim() != 4 or mid.shape[0] != up_rank or mid.shape[1] != rank:
            raise _fail(
                path, f"LoCon lora_mid shape {tuple(mid.shape)} does not fit up/down ranks", slot["mid"][0]
            )
    elif up_rank != rank:
        raise _fail(
            path,
            f"shape mismatch: up {tuple(up.shape)} has rank {up_rank}, "
            f"down {tuple(down.shape)} has rank {rank}",
            up_key,
        )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise _fail(path, f"conv lora_up must be 1x1, got {tuple(up.shape)}", up_key)
    module = LowRankModule(canonical=canonical, stem=stem, down=down, up=up, mid=mid)
    module.alpha = _alpha(path, slot, stem, module.rank, settings)
    module.dora_scale = _check_dora(path, slot, module.out_features, module.in_features, "LoRA")
    return module


def _build_structured(
    path: Path,
    canonical: str,
    stem: str,
    kind: str,
    slot: Slot,
    settings: AdapterSettings,
    dtypes: Mapping[str, str],
) -> StructuredModule:
    fmt = FORMAT_NAMES[kind]
    weights = {part: slot[part][1] for part in STRUCTURED_PARTS[kind] if part in slot}
    for part in STRUCTURED_PARTS[kind]:
        if part in slot:
            _check_weight(path, slot[part][0], slot[part][1], dtypes, f"{fmt} weight")
    mixed = [p for p in ("down", "up", "mid") if p in slot] + [
        p for other, parts in STRUCTURED_PARTS.items() if other != kind for p in parts if p in slot
    ]
    if mixed:
        key = slot[mixed[0]][0]
        raise _fail(
            path, f"{fmt} layer {stem} also has {_part_name(key, stem)} (two formats in one layer)", key
        )
    try:
        module = StructuredModule(canonical=canonical, stem=stem, kind=kind, weights=weights)
    except StructureError as exc:
        part = exc.key_part if exc.key_part in slot else next(iter(weights))
        message = str(exc).replace(f"{fmt} layer ", f"{fmt} layer {stem} ", 1)
        raise _fail(path, message, slot[part][0]) from None
    module.alpha = _alpha(path, slot, stem, module.rank, settings) if kind != "full" else None
    module.dora_scale = _check_dora(path, slot, module.out_features, module.in_features, fmt)
    return module


def _build_oft(
    path: Path, canonical: str, stem: str, slot: Slot, settings: AdapterSettings, dtypes: Mapping[str, str]
) -> OftModule:
    """OFT/BOFT (see `oft.py`): the ΔW needs the base weight, so the module is bound to it later."""
    stores_rotation = "oft_blocks" not in slot
    part = "oft_diag" if stores_rotation else "oft_blocks"
    fmt = "OFT"
    extra = [p for p in slot if p not in ("oft_blocks", "oft_diag", "rescale", "alpha")]
    if "oft_blocks" in slot and "oft_diag" in slot:
        extra.insert(0, "oft_diag")
    if extra:
        key = slot[extra[0]][0]
        raise _fail(
            path, f"{fmt} layer {stem} also has {_part_name(key, stem)} (two formats in one layer)", key
        )
    key, blocks = slot[part]
    _check_weight(path, key, blocks, dtypes, f"{fmt} {part}")
    rescale = None
    if "rescale" in slot:
        _check_weight(path, slot["rescale"][0], slot["rescale"][1], dtypes, f"{fmt} rescale")
        rescale = slot["rescale"][1]
    alpha = _alpha(path, slot, stem, 1, settings) if "alpha" in slot else None
    try:
        return OftModule(
            canonical, stem, blocks, stores_rotation=stores_rotation, alpha=alpha, rescale=rescale
        )
    except OftShapeError as exc:
        message = str(exc).replace(" layer ", f" layer {stem} ", 1)
        raise _fail(path, message, slot[exc.key_part][0] if exc.key_part in slot else key) from None


def _group(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, Slot], dict[str, str], dict[str, int]]:
    parts: dict[str, Slot] = {}
    stems: dict[str, str] = {}
    unsupported: dict[str, int] = {}
    for key, tensor in tensors.items():
        parsed: ParsedKey | None = parse_lora_key(key)
        if parsed is None:
            unsupported[key] = unsupported.get(key, 0) + 1
            continue
        if parsed.part not in _KNOWN_PARTS:
            unsupported[parsed.part] = unsupported.get(parsed.part, 0) + 1
            continue
        slot = parts.setdefault(parsed.canonical, {})
        if parsed.part in slot:
            raise LoraFileError("", f"two keys give layer {parsed.canonical} a '{parsed.part}' weight", key)
        slot[parsed.part] = (key, tensor)
        stems.setdefault(parsed.canonical, parsed.stem)
    return parts, stems, unsupported


def _input_size(module: LoraModule) -> int | None:
    """The layer's input size as the file tells it; None for OFT (only the base weight knows it)."""
    if isinstance(module, OftModule):
        return None
    return int(module.down.shape[1]) if isinstance(module, LowRankModule) else module.in_features


def _flux_layout(path: Path, modules: dict[str, LoraModule]) -> dict[str, LoraModule]:
    """diffusers/XLabs FLUX names -> BFL names, split layers gathered into row slices (see flux_names)."""
    out: dict[str, LoraModule] = {}
    sliced: dict[str, SlicedModule] = {}
    for name, module in modules.items():
        target = bfl_name(name)
        if target is None:
            out.setdefault(name, module)
            continue
        layer, slot = target
        if slot is not None and isinstance(module, OftModule):
            raise _fail(
                path, f"OFT layer {module.stem} adapts a slice of FLUX layer {layer}; no host reads that"
            )
        if slot is None:
            if layer in out:
                raise _fail(path, f"two layers of this file adapt FLUX layer {layer}", module.stem)
            module.canonical = layer
            out[layer] = module
            continue
        assert not isinstance(module, SlicedModule)
        assert not isinstance(module, OftModule)
        start, rows, height = slot_rows(
            slot,
            module.in_features if isinstance(module, StructuredModule) else int(module.down.shape[1]),
            layer,
        )
        if module.out_features != rows:
            raise _fail(
                path,
                f"FLUX layer {module.stem} has {module.out_features} outputs; "
                f"its slice of {layer} has {rows}",
                module.stem,
            )
        entry = sliced.setdefault(layer, SlicedModule(layer, module.stem, height, module.in_features, []))
        if any(first == start for first, _ in entry.slices) or entry.in_features != module.in_features:
            raise _fail(path, f"layers of this file overlap in FLUX layer {layer}", module.stem)
        entry.slices.append((start, module))
    for layer, entry in sliced.items():
        if layer in out:
            raise _fail(path, f"FLUX layer {layer} is adapted both whole and in slices", entry.stem)
        entry.slices.sort(key=lambda item: item[0])
        out[layer] = entry
    return out


def _no_modules_message(unsupported: Mapping[str, int]) -> str:
    unread = sorted({fmt for part, fmt in _UNREAD_FORMATS.items() if part in unsupported})
    if unread:
        return (
            f"this is a {'/'.join(unread)} file in a layout no WebUI reads (oft_R/boft_R); K-LoRA reads "
            "LoRA, LoCon, LoHa, LoKr, full, DoRA, OFT and BOFT (oft_blocks/oft_diag) layers"
        )
    found = ", ".join(sorted(unsupported)[:5]) or "no tensors"
    return f"no LoRA layers found (up/down, LoHa, LoKr or diff weights); saw {found}"


def _build_lora(
    path: Path, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], dtypes
) -> LoraFile:
    try:
        parts, stems, unsupported = _group(tensors)
    except LoraFileError as exc:
        raise _fail(path, exc.reason, exc.key) from None
    settings = adapter_settings(metadata)
    modules: dict[str, LoraModule] = {}
    for canonical, slot in parts.items():
        stem = stems[canonical]
        kind = structured_kind(set(slot))
        if "oft_blocks" in slot or "oft_diag" in slot:
            modules[canonical] = _build_oft(path, canonical, stem, slot, settings, dtypes)
        elif "rescale" in slot and kind is None and "down" not in slot:
            key = slot["rescale"][0]
            raise _fail(path, f"OFT layer {stem} has rescale but no oft_blocks", key)
        elif kind is None:
            modules[canonical] = _build_low_rank(path, canonical, stem, slot, settings, dtypes)
        else:
            modules[canonical] = _build_structured(path, canonical, stem, kind, slot, settings, dtypes)
    if not modules:
        raise _fail(path, _no_modules_message(unsupported))
    # an OFT layer's input size is unknown: its name still counts, its size (0) matches no architecture
    sizes = {n: _input_size(m) or 0 for n, m in modules.items()}
    architecture = detect_base_architecture(sizes, dict(metadata))
    # diffusers' "text_encoder" is SDXL's first encoder (kohya "te1"); only the architecture tells.
    aligned = {align_text_encoder(name, architecture): m for name, m in modules.items()}
    for name, module in aligned.items():
        module.canonical = name
    if architecture == "flux":
        aligned = _flux_layout(path, aligned)
    return LoraFile(
        path=path,
        sha256="",
        metadata=dict(metadata),
        modules=aligned,
        architecture=architecture,
        unsupported=unsupported,
    )


def read_lora_file(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA safetensors file. Every problem raises `LoraFileError` naming the file (and key).

    The file is only read, never renamed or modified."""
    path = Path(path)
    contents = read_safetensors(path)
    lora = _build_lora(path, contents.tensors, contents.metadata, contents.source_dtypes)
    lora.sha256 = contents.sha256
    return lora
