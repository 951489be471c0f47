from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _load_installer():
    spec = importlib.util.spec_from_file_location("klora_install_under_test", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_launch(installed: set[str], skip_install: bool = False):
    calls: list[str] = []
    launch = SimpleNamespace(
        args=SimpleNamespace(skip_install=skip_install),
        is_installed=lambda dist: dist in installed,
        run_pip=lambda command, desc: calls.append(command),
    )
    return launch, calls


def test_installs_only_what_is_missing() -> None:
    installer = _load_installer()
    launch, calls = _fake_launch({"safetensors", "einops"})
    assert installer.install(launch) == ["open-clip-torch"]
    assert calls == ["install open-clip-torch"]  # no version: never upgrades, never pins over the host


def test_nothing_when_host_has_everything() -> None:
    installer = _load_installer()
    launch, calls = _fake_launch(set(installer.REQUIREMENTS))
    assert installer.install(launch) == [] and calls == []


def test_skip_install_is_honoured() -> None:
    installer = _load_installer()
    launch, calls = _fake_launch(set(), skip_install=True)
    assert installer.install(launch) == [] and calls == []
