"""Reference images for guidance, as uploads: raw bytes from the accordion or base64 text from the API.

Torch-free, so the parameter model (and the HTTP validator that uses it) can check uploads before a job.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from lib_klora.errors import KLoraError

__all__ = ["MAX_REFERENCE_PIXELS", "ReferenceImageError", "decode_reference_image"]

MAX_REFERENCE_PIXELS = 64 * 1024 * 1024  # a reference larger than this is refused rather than decoded


class ReferenceImageError(KLoraError):
    """A reference image upload cannot be decoded."""


def decode_reference_image(data: bytes | str, *, name: str = "reference image") -> Image.Image:
    """Decode an uploaded reference: raw image bytes, or a base64 string (a ``data:image/...;base64,`` URL
    prefix is accepted). Returns an RGB PIL image; raises :class:`ReferenceImageError` with a message."""
    if isinstance(data, str):
        text = data.strip()
        if text.startswith("data:"):
            header, sep, text = text.partition(",")
            if not sep or ";base64" not in header:
                raise ReferenceImageError(
                    f"{name}: a data URL must be base64-encoded (data:image/png;base64,...)"
                )
        text = "".join(text.split())  # line breaks are common in pasted base64
        text += "=" * (-len(text) % 4)  # tolerate stripped padding
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ReferenceImageError(f"{name}: not valid base64 ({exc})") from exc
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        raise ReferenceImageError(
            f"{name}: expected image bytes or a base64 string, got {type(data).__name__}"
        )
    if not raw:
        raise ReferenceImageError(f"{name}: empty")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_REFERENCE_PIXELS:
                raise ReferenceImageError(
                    f"{name}: {im.width}×{im.height} is too large to use as a reference"
                )
            im.load()
            return im.convert("RGB")
    except ReferenceImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError) and truncated files as OSError.
        raise ReferenceImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc
