"""One exception family for everything a user can get wrong."""

from __future__ import annotations

from pathlib import Path


class KLoraError(ValueError):
    """Base class of every error K-LoRA reports to a user."""


class LoraFileError(KLoraError):
    """A LoRA file cannot be used. Names the file and, where known, the key."""

    def __init__(self, path: str | Path, message: str, key: str | None = None) -> None:
        self.path = str(path)
        self.key = key
        self.reason = message
        where = f"{self.path}" + (f", key '{key}'" if key else "")
        super().__init__(f"{where}: {message}")


class IncompatibleLorasError(KLoraError):
    """The two LoRAs cannot be fused (different base models, nothing in common)."""


class ModelUnavailableError(KLoraError):
    """Weights for a guidance/evaluation model are neither on disk nor downloadable."""
