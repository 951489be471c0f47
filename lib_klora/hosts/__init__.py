"""Host adapters. The host is recognised by capability (what imports), never by a version string."""

from __future__ import annotations

import importlib.util


def detect_host() -> str:
    """'forge' (backend/ architecture), 'reforge' (ldm_patched), or 'a1111'."""
    if (
        importlib.util.find_spec("backend") is not None
        and importlib.util.find_spec("backend.patcher") is not None
    ):
        return "forge"
    if importlib.util.find_spec("ldm_patched") is not None:
        return "reforge"
    return "a1111"


def load_script_class() -> type:
    host = detect_host()
    if host != "a1111":
        raise ImportError(
            f"sd-webui-klora: this WebUI looks like {host}, which this release does not support yet "
            "(AUTOMATIC1111 v1.10 only); K-LoRA stays inactive"
        )
    from . import a1111

    a1111.register_callbacks()
    return a1111.KLoraScript
