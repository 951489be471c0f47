"""Native X/Y/Z plot axes: which parameters can vary across a grid, and how a cell value applies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

try:  # pydantic 2 (Forge), and pydantic >= 1.10.17 (A1111), expose the v1 API under this name
    from pydantic.v1 import validate_model
except ImportError:  # older pydantic 1.x
    from pydantic import validate_model  # type: ignore[no-redef]

from lib_klora.params.fields import CHOICES
from lib_klora.params.model import DEFAULTS, KLoraParams, from_validation_error, prepare_fields


class XyzAxis(NamedTuple):
    label: str  # as shown in the X/Y/Z plot's axis dropdown
    field: str  # KLoraParams field the cell value goes to
    value_type: Literal["str", "float", "bool"]
    choices: tuple[str, ...] | None  # None: free values (LoRA names come from the host's list)


XYZ_AXES: tuple[XyzAxis, ...] = (
    XyzAxis("[K-LoRA] Enabled", "enabled", "bool", ("true", "false")),
    XyzAxis("[K-LoRA] Subject LoRA", "subject", "str", None),
    XyzAxis("[K-LoRA] Style LoRA", "style", "str", None),
    XyzAxis("[K-LoRA] Method", "method", "str", CHOICES["method"]),
    XyzAxis("[K-LoRA] Pattern", "pattern", "str", CHOICES["pattern"]),
    XyzAxis("[K-LoRA] Alpha", "alpha", "float", None),
    XyzAxis("[K-LoRA] Beta", "beta", "float", None),
    XyzAxis("[K-LoRA] Subject strength", "subject_strength", "float", None),
    XyzAxis("[K-LoRA] Style strength", "style_strength", "float", None),
    XyzAxis("[K-LoRA] KL temperature", "kl_temperature", "float", None),
    XyzAxis("[K-LoRA] KL direction", "kl_direction", "str", CHOICES["kl_direction"]),
    XyzAxis("[K-LoRA] Guidance", "guidance", "bool", ("true", "false")),
    XyzAxis("[K-LoRA] Guidance eta", "guidance_eta", "float", None),
    XyzAxis("[K-LoRA] Guidance style weight", "guidance_style", "float", None),
    XyzAxis("[K-LoRA] Guidance subject weight", "guidance_subject", "float", None),
    XyzAxis("[K-LoRA] Guidance end", "guidance_end", "float", None),
)


def apply_xyz(params_dict: Mapping[str, Any], field: str, raw_value: object) -> dict[str, Any]:
    """A new override dict with `field` set to the validated cell value; the input is not changed.

    Only the field's own rule applies here; cross-field rules run when the overrides are merged
    into the UI/API parameters with :meth:`KLoraParams.with_overrides`.
    """
    clean = prepare_fields({field: raw_value})
    values, _, error = validate_model(KLoraParams, clean)
    if error is not None:
        raise from_validation_error(error, clean).relabel(label=lambda f: f"X/Y/Z axis value for '{f}'")
    return {**params_dict, field: values.get(field, DEFAULTS[field])}
