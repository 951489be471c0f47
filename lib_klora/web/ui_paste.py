"""Infotext paste: which component each "K-LoRA ..." key of a pasted image fills, and with what."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import gradio as gr

from lib_klora.params.fields import (
    REFERENCE_FIELDS,
)
from lib_klora.params.model import KLoraParams
from lib_klora.params.parsing import ParamsError
from lib_klora.web.ui_values import GRADIO_MAJOR, NUMBER_LIMITS, ui_value


class PasteKey(str):
    """An infotext field name that is also the paste function for its component.

    A1111 and Forge call a callable target with the parsed infotext (so paste goes through
    KLoraParams.from_infotext, one parser for every field), while "Send to img2img" copies only the
    fields whose name is in ``paste_field_names``: being a `str`, this key matches there too.
    """

    field_name: str
    _reader: InfotextReader
    _raw_none: bool

    def __new__(cls, key: str, field_name: str, reader: InfotextReader, raw_none: bool) -> PasteKey:
        self = super().__new__(cls, key)
        self.field_name = field_name
        self._reader = reader
        self._raw_none = raw_none
        return self

    def __call__(self, entries: Mapping[str, Any]) -> Any:
        params = self._reader.read(entries)
        value = _NO_CHANGE if params is _UNREADABLE else paste_value(params, self.field_name)
        if value is _NO_CHANGE:
            return None  # the host leaves the component as it is
        # The host casts plain values to type(component.value); a component created empty (None)
        # would swallow them, so those get an update dict, which A1111 and Forge pass through.
        # gradio 3 turns any update of a Number into one with step=1 (its Number.update default), so
        # there the float boxes get their arrow step again. Only there: Forge's API `infotext` reads
        # gradio 3's "generic_update" dicts but would choke on gradio 4's.
        step = NUMBER_LIMITS[self.field_name][2] if self.field_name in NUMBER_LIMITS else None
        if step is not None and GRADIO_MAJOR < 4:
            return gr.update(value=value, step=step)
        return gr.update(value=value) if self._raw_none else value


_NO_CHANGE = object()


def paste_value(params: KLoraParams | None, name: str) -> Any:
    """What pasting an infotext puts in the component of `name`.

    `params` is ``KLoraParams.from_infotext(...)``: None means the image was made without K-LoRA, which
    switches K-LoRA off and leaves every other control alone. The reference images are never in an
    infotext, so their upload boxes are always left alone.
    """
    if name in REFERENCE_FIELDS:
        return _NO_CHANGE
    if params is None:
        return False if name == "enabled" else _NO_CHANGE
    return ui_value(params, name)


class InfotextReader:
    """Parses one pasted infotext once, although every component's PasteKey asks for it.

    The host calls all targets with the same dict object, so the cache holds a reference to it and
    compares by identity. One tuple attribute, swapped whole, keeps concurrent pastes consistent.
    """

    def __init__(self) -> None:
        self._cache: tuple[Mapping[str, Any], Any] | None = None

    def read(self, entries: Mapping[str, Any]) -> Any:
        """KLoraParams, None (no K-LoRA in the infotext) or _UNREADABLE (K-LoRA entries that do not parse)."""
        cached = self._cache
        if cached is not None and cached[0] is entries:
            return cached[1]
        try:
            params: Any = KLoraParams.from_infotext(entries)
        except ParamsError as exc:
            # Reported once per paste; every K-LoRA control then stays as it is.
            print(f"K-LoRA: cannot paste these parameters: {exc}", file=sys.stderr)
            params = _UNREADABLE
        self._cache = (entries, params)
        return params


_UNREADABLE: Any = object()
