"""Native X/Y/Z plot axes for K-LoRA (A1111 and Forge share `scripts/xyz_grid.py`).

The grid script has no registration API: its module-level list ``axis_options`` is what its UI reads,
so axes are appended there from an ``on_before_ui`` callback, when every script module is loaded.
An axis never touches UI state: its apply function stores the validated cell value in
``p._klora_xyz`` (a dict of field -> value), which the script merges over its UI/API arguments.

Nothing here imports the WebUI: the `scripts` module and the grid module are passed in, so the tests
use fakes.
"""

from __future__ import annotations

import difflib
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from lib_klora.params.parsing import ParamsError
from lib_klora.params.xyz import XYZ_AXES, XyzAxis, apply_xyz

__all__ = [
    "LORA_AXIS_COST",
    "OVERRIDE_ATTR",
    "build_axis_options",
    "find_xyz_module",
    "register_xyz_axes",
    "store_override",
]

OVERRIDE_ATTR = "_klora_xyz"
# The grid changes costlier axes less often; a new LoRA pair means loading files and Top-K scores.
LORA_AXIS_COST = 0.5
_LORA_FIELDS = ("subject", "style")
_XYZ_MODULE_NAMES = ("xyz_grid.py", "xyz_grid")  # how A1111/Forge name the module they load the file as

ApplyToP = Callable[[Any, str, Any], None]


def find_xyz_module(scripts_module: Any) -> Any | None:
    """The loaded `scripts/xyz_grid.py` module, or None when the host has none."""
    for data in getattr(scripts_module, "scripts_data", None) or ():
        script_class = getattr(data, "script_class", None)
        if getattr(script_class, "__module__", None) in _XYZ_MODULE_NAMES:
            return getattr(data, "module", None)
    return None


def store_override(p: Any, field: str, value: Any) -> None:
    """Validate one cell value and record it on `p` (raises ParamsError on a bad value).

    The grid makes each cell's `p` with a shallow copy, so the dict is replaced, never mutated: a
    dict shared with the template `p` would leak one cell's value into the next.
    """
    current = getattr(p, OVERRIDE_ATTR, None) or {}
    setattr(p, OVERRIDE_ATTR, apply_xyz(dict(current), field, value))


def _check_names(field: str, values: Iterable[Any], lora_names: Callable[[], list[str]]) -> None:
    names = list(lora_names())
    if not names:  # list unavailable: leave the check to generation time
        return
    problems = []
    for value in values:
        if value not in names:
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append((field, f"no LoRA named {value!r}{hint}"))
    if problems:
        raise ParamsError(problems, context="X/Y/Z plot")


def _make_apply(field: str, apply_to_p: ApplyToP) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, value: Any, _values: Any) -> None:
        apply_to_p(p, field, value)

    return apply


def _make_confirm(field: str, lora_names: Callable[[], list[str]]) -> Callable[[Any, list[Any]], None]:
    # Runs once before the grid starts, so one bad cell stops the plot before any image is made.
    def confirm(_p: Any, values: list[Any]) -> None:
        for value in values:
            apply_xyz({}, field, value)
        if field in _LORA_FIELDS:
            _check_names(field, values, lora_names)

    return confirm


def _choices(axis: XyzAxis, lora_names: Callable[[], list[str]]) -> Callable[[], list[str]] | None:
    if axis.field in _LORA_FIELDS:
        return lambda: list(lora_names())
    if axis.choices is not None:
        options = list(axis.choices)
        return lambda: list(options)
    return None


def build_axis_options(
    xyz_module: Any, lora_names: Callable[[], list[str]], apply_to_p: ApplyToP = store_override
) -> list[Any]:
    """One ``xyz_module.AxisOption`` per entry of XYZ_AXES."""
    types = {"str": str, "bool": str, "float": float, "int": int}  # bools arrive as their choice words
    options = []
    for axis in XYZ_AXES:
        options.append(
            xyz_module.AxisOption(
                axis.label,
                types[axis.value_type],
                _make_apply(axis.field, apply_to_p),
                confirm=_make_confirm(axis.field, lora_names),
                cost=LORA_AXIS_COST if axis.field in _LORA_FIELDS else 0.0,
                choices=_choices(axis, lora_names),
            )
        )
    return options


def register_xyz_axes(
    xyz_module: Any, lora_names: Callable[[], list[str]], apply_to_p: ApplyToP = store_override
) -> int:
    """Append the K-LoRA axes to the grid's ``axis_options``; returns how many were added.

    Safe to call again (a UI reload runs ``on_before_ui`` again): labels already present are skipped.
    Never raises: a change in the host's grid script must not break WebUI startup.
    """
    if xyz_module is None:
        return 0
    try:
        present = {getattr(option, "label", None) for option in xyz_module.axis_options}
        new = [o for o in build_axis_options(xyz_module, lora_names, apply_to_p) if o.label not in present]
        xyz_module.axis_options.extend(new)
        return len(new)
    except Exception:
        print("K-LoRA: could not add the X/Y/Z plot axes; the plot works without them", file=sys.stderr)
        traceback.print_exc()
        return 0
