"""X/Y/Z plot axes against a fake grid module shaped like A1111/Forge `scripts/xyz_grid.py`."""

from __future__ import annotations

import copy
import types
from typing import Any

import pytest

from lib_klora.hosts import xyz
from lib_klora.params.model import KLoraParams
from lib_klora.params.parsing import ParamsError
from lib_klora.params.xyz import XYZ_AXES

NAMES = ["dog_subject", "ink_style"]


class AxisOption:
    """Same constructor as the host's (label, type, apply, format_value, confirm, cost, choices, prepare)."""

    def __init__(
        self,
        label: str,
        type: Any,
        apply: Any,
        format_value: Any = None,
        confirm: Any = None,
        cost: float = 0.0,
        choices: Any = None,
        prepare: Any = None,
    ) -> None:
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


def fake_grid() -> types.ModuleType:
    module = types.ModuleType("xyz_grid.py")
    module.AxisOption = AxisOption  # type: ignore[attr-defined]
    module.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Seed", int, None)]  # type: ignore[attr-defined]
    return module


def axis(module: Any, label: str) -> AxisOption:
    return next(option for option in module.axis_options if option.label == label)


def by_field(module: Any, field: str) -> AxisOption:
    label = next(a.label for a in XYZ_AXES if a.field == field)
    return axis(module, label)


def run_cell(option: AxisOption, p: Any, raw: str) -> None:
    """What the grid does per cell: convert the text with the axis type, then apply."""
    option.apply(p, option.type(raw), None)


@pytest.fixture
def grid() -> types.ModuleType:
    module = fake_grid()
    assert xyz.register_xyz_axes(module, lambda: NAMES) == len(XYZ_AXES)
    return module


# ---------------------------------------------------------------- finding the grid module


def scripts_with(*modules: tuple[str, Any]) -> Any:
    entries = []
    for class_module, module in modules:
        script_class = type("Script", (), {"__module__": class_module})
        entries.append(types.SimpleNamespace(script_class=script_class, module=module, path="x"))
    return types.SimpleNamespace(scripts_data=entries)


@pytest.mark.parametrize("name", ["xyz_grid.py", "xyz_grid"])
def test_find_xyz_module(name: str) -> None:
    grid = fake_grid()
    scripts = scripts_with(("prompt_matrix.py", object()), (name, grid))
    assert xyz.find_xyz_module(scripts) is grid


def test_find_xyz_module_absent() -> None:
    assert xyz.find_xyz_module(scripts_with(("prompt_matrix.py", object()))) is None
    assert xyz.find_xyz_module(types.SimpleNamespace()) is None
    assert xyz.register_xyz_axes(None, lambda: NAMES) == 0


# ---------------------------------------------------------------- registration


def test_registers_every_axis_once(grid: types.ModuleType) -> None:
    labels = [option.label for option in grid.axis_options]
    assert labels[:2] == ["Nothing", "Seed"]  # the host's own axes stay first and untouched
    assert labels[2:] == [a.label for a in XYZ_AXES]
    assert xyz.register_xyz_axes(grid, lambda: NAMES) == 0  # a UI reload registers again
    assert len(grid.axis_options) == 2 + len(XYZ_AXES)


def test_registration_errors_are_logged_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    broken = types.ModuleType("xyz_grid.py")
    broken.axis_options = []  # type: ignore[attr-defined]  # no AxisOption: the host changed
    assert xyz.register_xyz_axes(broken, lambda: NAMES) == 0
    assert "X/Y/Z" in capsys.readouterr().err


def test_axis_types_and_choices(grid: types.ModuleType) -> None:
    for spec in XYZ_AXES:
        option = axis(grid, spec.label)
        assert option.type is (float if spec.value_type == "float" else str)
        if spec.field in ("subject", "style"):
            assert option.choices() == NAMES
            assert option.cost > 0  # new LoRAs are costly: the grid changes them least often
        elif spec.choices is not None:
            assert option.choices() == list(spec.choices)
        else:
            assert option.choices is None


def test_lora_choices_follow_the_current_list() -> None:
    names = ["one"]
    module = fake_grid()
    xyz.register_xyz_axes(module, lambda: names)
    names.append("two")
    assert by_field(module, "subject").choices() == ["one", "two"]


# ---------------------------------------------------------------- apply and confirm


def test_apply_stores_validated_values(grid: types.ModuleType) -> None:
    p = types.SimpleNamespace()
    run_cell(by_field(grid, "alpha"), p, "2.5")
    run_cell(by_field(grid, "pattern"), p, "S*")
    run_cell(by_field(grid, "enabled"), p, "true")
    run_cell(by_field(grid, "subject"), p, "dog_subject")
    assert p._klora_xyz == {"alpha": 2.5, "pattern": "s*", "enabled": True, "subject": "dog_subject"}
    # what the script does with them
    merged = KLoraParams.from_any([{**KLoraParams(style="ink_style").to_dict(), **p._klora_xyz}])
    assert (merged.alpha, merged.pattern, merged.enabled) == (2.5, "s*", True)


def test_bool_axis_off(grid: types.ModuleType) -> None:
    p = types.SimpleNamespace()
    run_cell(by_field(grid, "enabled"), p, "false")
    assert p._klora_xyz == {"enabled": False}


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("alpha", -1.0),
        ("alpha", 0.0),
        ("pattern", "t"),
        ("method", "best"),
        ("subject", "../x"),
        ("enabled", "maybe"),
    ],
)
def test_apply_rejects_bad_values(grid: types.ModuleType, field: str, raw: Any) -> None:
    p = types.SimpleNamespace()
    with pytest.raises(ParamsError):
        by_field(grid, field).apply(p, raw, None)
    assert not hasattr(p, "_klora_xyz")


def test_cells_do_not_share_the_override_dict(grid: types.ModuleType) -> None:
    template = types.SimpleNamespace(_klora_xyz={"beta": 0.7})
    cell_a, cell_b = copy.copy(template), copy.copy(template)  # the grid copies p shallowly per cell
    run_cell(by_field(grid, "alpha"), cell_a, "3")
    assert cell_a._klora_xyz == {"beta": 0.7, "alpha": 3.0}
    assert cell_b._klora_xyz == template._klora_xyz == {"beta": 0.7}


def test_confirm_checks_all_values_before_the_grid_runs(grid: types.ModuleType) -> None:
    by_field(grid, "alpha").confirm(None, [1.0, 2.0])
    with pytest.raises(ParamsError):
        by_field(grid, "alpha").confirm(None, [1.0, 99.0])


def test_confirm_checks_lora_names(grid: types.ModuleType) -> None:
    by_field(grid, "style").confirm(None, ["ink_style", "dog_subject"])
    with pytest.raises(ParamsError, match="did you mean 'ink_style'"):
        by_field(grid, "style").confirm(None, ["ink_styel"])


def test_confirm_skips_the_name_check_without_a_list() -> None:
    module = fake_grid()
    xyz.register_xyz_axes(module, lambda: [])
    by_field(module, "subject").confirm(None, ["anything"])


def test_custom_apply_to_p() -> None:
    seen = []
    module = fake_grid()
    xyz.register_xyz_axes(module, lambda: NAMES, lambda p, field, value: seen.append((field, value)))
    by_field(module, "beta").apply(object(), 0.9, [0.9])
    assert seen == [("beta", 0.9)]
