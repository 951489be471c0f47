"""WebUI installer hook: installs only what the host lacks and never upgrades what it has.

The WebUI runs this file at start-up (not with --skip-install). Host pins (e.g. A1111's
open-clip-torch 2.20.0, einops 0.4.1) are left alone on purpose: upgrading them breaks the host.
"""

from __future__ import annotations

# distribution name -> pip requirement used only when the distribution is missing
REQUIREMENTS = {
    "safetensors": "safetensors",
    "einops": "einops",
    "open-clip-torch": "open-clip-torch",
}


def missing_requirements(is_installed) -> list[str]:
    return [spec for dist, spec in REQUIREMENTS.items() if not is_installed(dist)]


def install(launch_module) -> list[str]:
    if getattr(getattr(launch_module, "args", None), "skip_install", False):
        return []
    missing = missing_requirements(launch_module.is_installed)
    for spec in missing:
        launch_module.run_pip(f"install {spec}", f"sd-webui-klora requirement: {spec}")
    return missing


if __name__ == "__main__":  # the WebUI runs installers as a subprocess with its own dir on PYTHONPATH
    import launch

    install(launch)
