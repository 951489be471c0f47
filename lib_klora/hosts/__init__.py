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
    """The script class of the running WebUI, with its callbacks registered (called once, at import)."""
    host = detect_host()
    if host == "a1111":
        from lib_klora.hosts import a1111

        a1111.register_callbacks()
        return a1111.KLoraScript
    from lib_klora.hosts import forge

    forge.register_callbacks(host)
    return forge.KLoraScript
