"""First-use downloads of guidance weights into one folder the user can see (the WebUI's models/klora).

Files come from the Hugging Face hub through ``huggingface_hub`` (which every host already has: transformers
and open_clip depend on it), with its console progress bar, and are renamed into place only when complete,
so an interrupted download never leaves a truncated file that would later fail to load.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from lib_klora.errors import ModelUnavailableError

Progress = Callable[[str], None]


class DownloadError(ModelUnavailableError):
    """A weights file could not be downloaded; the message says what to fetch and where to put it."""


def _hub_offline() -> bool:
    with contextlib.suppress(ImportError, AttributeError):
        import huggingface_hub.constants as hub

        if hub.HF_HUB_OFFLINE:
            return True
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hugging Face endpoint. With a proxy configured, assume it is reachable."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def download_file(
    repo_id: str, filename: str, target: str | Path, *, progress: Progress | None = None, timeout: float = 3.0
) -> Path:
    """Download ``filename`` of the hub repo ``repo_id`` to ``target`` (created atomically); return it.

    Raises :class:`DownloadError` naming the URL and the target path when offline or on any failure.
    """
    target = Path(target)
    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    manual = f"Download {url} and save it as {target}"
    if _hub_offline():
        raise DownloadError(f"{target.name} is missing and Hugging Face downloads are switched off. {manual}")
    if not hub_reachable(timeout):
        raise DownloadError(f"{target.name} is missing and huggingface.co cannot be reached. {manual}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise DownloadError(f"{target.name} is missing and huggingface_hub is missing. {manual}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(f"downloading {repo_id}/{filename} to {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        try:
            fetched = hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=scratch)
        except Exception as exc:  # network/hub errors come in many types across huggingface_hub versions
            raise DownloadError(f"downloading {url} failed ({type(exc).__name__}: {exc}). {manual}") from exc
        partial = target.with_name(target.name + ".part")
        shutil.copyfile(fetched, partial)
        os.replace(partial, target)
    return target
