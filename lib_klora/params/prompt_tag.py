"""The ``<klora:subject:style[:subject_strength[:style_strength]][:key=value...]>`` prompt tag.

The WebUI's extra-network parser hands the tag over as ``positional`` / ``named`` strings (items split
on ":", then on "="); :func:`params_from_tag` turns them into :class:`KLoraParams`, overriding the
accordion/API parameters given as ``base`` and enabling K-LoRA. Values are only parsed, never evaluated.

Named keys are the parameter field names (``method``, ``pattern``, ``alpha``, ``beta``, ``gamma``,
``seed``, ``hires``, ``subject_strength``, ...) plus these short aliases, case-insensitive:

* ``te``: ``te_policy`` (both / subject / style / none)
* ``map``: ``show_map``
* ``hr_method``, ``hr_pattern``, ``hr_alpha``, ``hr_beta``: ``hires_method`` ... (with ``hires=separate``)
* ``eta``: ``guidance_eta``; ``clip``, ``dino``: ``clip_model``, ``dino_model`` (write ``ViT-L-14/openai``:
  a ":" would end the item)

Reference images (``style_refs``, ``subject_refs``) cannot be written in a tag; they come from the
accordion or the API dict, so ``guidance=true`` in a tag uses the images given there.

Anything the tag leaves out keeps the base value. An empty positional strength (``<klora:a:b::0.5>``)
also keeps the base value, so the style strength can be given alone.

:func:`find_tags` mirrors the host's parser so the HTTP layer can reject a bad tag before a job
starts; it only looks at ``klora`` tags.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping

from lib_klora.params.fields import REFERENCE_FIELDS
from lib_klora.params.model import POSITIONAL_FIELDS, KLoraParams
from lib_klora.params.parsing import ParamsError

__all__ = [
    "TAG_ALIASES",
    "TAG_KEYS",
    "TAG_NAME",
    "find_extra_networks",
    "find_tags",
    "format_tag",
    "params_from_prompt",
    "params_from_tag",
    "strip_tags",
]

TAG_NAME = "klora"
# The WebUI's extra-network syntax: "<", a word-character network name, ":", anything up to ">".
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")

TAG_ALIASES: dict[str, str] = {
    "te": "te_policy",
    "map": "show_map",
    "hr_method": "hires_method",
    "hr_pattern": "hires_pattern",
    "hr_alpha": "hires_alpha",
    "hr_beta": "hires_beta",
    "eta": "guidance_eta",
    "clip": "clip_model",
    "dino": "dino_model",
}
# subject and style are positional only; `enabled` is implied by writing the tag at all.
TAG_KEYS: dict[str, str] = {
    **{
        name: name
        for name in POSITIONAL_FIELDS
        if name not in ("enabled", "subject", "style", *REFERENCE_FIELDS)  # images come from the UI/API
    },
    **TAG_ALIASES,
}
_POSITIONAL_ROLES = (
    ("subject", "subject LoRA"),
    ("style", "style LoRA"),
    ("subject_strength", "subject strength"),
    ("style_strength", "style strength"),
)


def format_tag(positional: list[str], named: Mapping[str, str]) -> str:
    """The tag as written (items in parser order), for error messages and the UI."""
    items = [*positional, *(f"{key}={value}" for key, value in named.items())]
    return f"<{TAG_NAME}:{':'.join(items)}>"


def params_from_tag(
    positional: list[str], named: Mapping[str, str], base: KLoraParams | None = None
) -> KLoraParams:
    """Parameters of one ``<klora:...>`` tag on top of ``base`` (defaults when None)."""
    tag = format_tag(positional, named)

    def fail(message: str) -> ParamsError:
        return ParamsError([("", message)], context=tag)

    items = [str(item).strip() for item in positional]
    if len(items) > len(_POSITIONAL_ROLES):
        extra = items[len(_POSITIONAL_ROLES)]
        if "=" in extra:  # "a=b=c" is not a named item for the host's parser
            raise fail(f"{extra!r} is not a key=value item (one '=' only)")
        raise fail(
            f"unexpected item {extra!r}: write subject:style[:subject strength[:style strength]], "
            "then key=value items"
        )
    if not items or not items[0]:
        raise fail("missing subject LoRA: write <klora:subject:style>")
    if len(items) < 2 or not items[1]:
        raise fail("missing style LoRA: write <klora:subject:style>")
    overrides: dict[str, object] = {"enabled": True}
    source: dict[str, str] = {}  # field -> how the tag wrote it, for error messages
    for (field, role), item in zip(_POSITIONAL_ROLES, items, strict=False):
        if not item:
            continue  # only a strength can be empty here: it keeps the base value
        if field.endswith("_strength"):
            if "=" in item:  # the host's parser leaves "a=b=c" positional
                raise fail(f"{item!r} is not a key=value item (one '=' only)")
            try:
                float(item)
            except ValueError:
                raise fail(f"{role} {item!r} is not a number") from None
        overrides[field] = item
        source[field] = role

    for raw_key, value in named.items():
        key = str(raw_key).strip().lower()
        field = TAG_KEYS.get(key)
        if field is None:
            close = difflib.get_close_matches(key, TAG_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise fail(f"unknown key {str(raw_key)!r}{hint}; known keys: {', '.join(TAG_KEYS)}")
        if field in source:
            raise fail(f"{source[field]!r} and {key!r} set the same parameter")
        overrides[field] = str(value).strip()
        source[field] = key

    try:
        return (base or KLoraParams()).with_overrides(overrides)
    except ParamsError as exc:
        raise exc.relabel(context=tag, label=lambda f: repr(source.get(f, f))) from None


def find_extra_networks(prompt: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """``(network name, positional, named)`` of every extra-network tag (``<lora:...>`` too), in order.

    Split exactly as the WebUI splits them: items on ":", then an item with exactly one "=" is named.
    """
    found = []
    for match in _EXTRA_NETWORK.finditer(prompt):
        positional: list[str] = []
        named: dict[str, str] = {}
        for item in match.group(2).split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]  # a repeated key: the last one wins, as in the host
            else:
                positional.append(item)
        found.append((match.group(1), positional, named))
    return found


def find_tags(prompt: str) -> list[tuple[list[str], dict[str, str]]]:
    """``(positional, named)`` of every ``<klora:...>`` tag, in prompt order."""
    # The host looks networks up by exact name, so <KLora:...> is not ours.
    return [
        (positional, named) for name, positional, named in find_extra_networks(prompt) if name == TAG_NAME
    ]


def strip_tags(prompt: str) -> str:
    """The prompt without its ``<klora:...>`` tags; other extra networks (``<lora:...>``) stay."""
    return _EXTRA_NETWORK.sub(lambda m: "" if m.group(1) == TAG_NAME else m.group(0), prompt)


def params_from_prompt(prompt: str, base: KLoraParams | None = None) -> KLoraParams | None:
    """Validate every ``<klora:...>`` tag of a prompt; the first one's parameters, or None without tags.

    The WebUI uses only the first tag, but a mistake in any of them is reported (API pre-validation).
    """
    results = [params_from_tag(positional, named, base) for positional, named in find_tags(prompt)]
    return results[0] if results else None


HIRES_PAIR_RULE = "the hires prompt's <klora> tag must name the same subject and style LoRAs"


def same_loras(*params: KLoraParams | None) -> bool:
    """Whether every given pass (None: no K-LoRA there) fuses the same subject and style: a hires tag may
    change settings, never the LoRAs, since both passes share one loaded pair."""
    pairs = {(p.subject, p.style) for p in params if p is not None}
    return len(pairs) <= 1
