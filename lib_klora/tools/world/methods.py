"""The fidelity benchmark's rows (torch-free, so the command line can list them without loading models)."""

from __future__ import annotations

from typing import Any

# row name -> the generic engine's parameters (the plain rows run without the engine)
FUSION_METHODS: dict[str, dict[str, Any]] = {
    "stacked": {"method": "merge"},
    "klora_s": {"method": "klora", "pattern": "s"},
    "klora_s*": {"method": "klora", "pattern": "s*"},
    "fixed": {"method": "fixed"},
    "random": {"method": "random", "seed": 0},
    "dynamic": {"method": "dynamic"},
    "dynamic_hybrid": {"method": "dynamic", "kl_hybrid": True},
    "guided": {"method": "klora", "pattern": "s", "guidance": True},
}
PLAIN_METHODS = ("base", "subject_only", "style_only")
METHODS: tuple[str, ...] = (*PLAIN_METHODS, *FUSION_METHODS)
