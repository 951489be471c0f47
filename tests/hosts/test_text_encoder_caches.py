"""K-LoRA's conditioning caches: an identical next job reuses the text encoder's output, another does not."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from lib_klora.params.model import KLoraParams
from tests.hosts.module_swap import swapped_modules

FIRST = KLoraParams(enabled=True, subject="dog", style="ink")


@pytest.fixture(autouse=True)
def job_start() -> Iterator[Any]:
    """The host-free module, imported for this test only (the host fakes import it afresh themselves)."""
    with swapped_modules({}, ["lib_klora.hosts.job_start"]):
        yield importlib.import_module("lib_klora.hosts.job_start")


def caches_and_key(job_start: Any) -> tuple[Any, Any]:
    return job_start.TextEncoderCaches(), job_start.text_encoder_key


def processing(hires: bool = True) -> Any:
    p = SimpleNamespace(cached_c="host", cached_uc="host")
    if hires:
        p.cached_hr_c = p.cached_hr_uc = "host"
    return p


def filled(caches: Any, key: tuple) -> Any:
    """A job binds the caches and the host fills them, as `get_conds_with_caching` does in place."""
    p = processing()
    caches.bind(p, key)
    pairs = ((p.cached_c, "c"), (p.cached_uc, "uc"), (p.cached_hr_c, "hr_c"), (p.cached_hr_uc, "hr_uc"))
    for cache, conds in pairs:
        if cache[0] is None:
            cache[0], cache[1] = ("prompts", 20), conds
    return p


def test_an_identical_next_job_gets_the_same_filled_caches(job_start: Any) -> None:
    caches, key = caches_and_key(job_start)
    first = filled(caches, key(FIRST, None))
    p = processing()
    caches.bind(p, key(KLoraParams(enabled=True, subject="dog", style="ink"), None))
    assert p.cached_c is first.cached_c and p.cached_c == [("prompts", 20), "c"]
    for name in ("cached_uc", "cached_hr_c", "cached_hr_uc"):
        assert getattr(p, name) is getattr(first, name), name
    assert p.cached_c is not p.cached_uc  # four separate lists, never one aliased


@pytest.mark.parametrize(
    "first, hires",
    [
        (FIRST.with_overrides({"te_policy": "none"}), None),
        (FIRST.with_overrides({"subject_strength": 0.5}), None),
        (FIRST.with_overrides({"style_strength": 0.5}), None),
        (FIRST.with_overrides({"style": "oil"}), None),
        (FIRST, FIRST.with_overrides({"te_policy": "subject"})),
    ],
    ids=["te-policy", "subject-strength", "style-strength", "other-lora", "hires-pass"],
)
def test_a_job_that_changes_the_text_encoder_starts_empty(
    job_start: Any, first: KLoraParams, hires: KLoraParams | None
) -> None:
    caches, key = caches_and_key(job_start)
    before = filled(caches, key(FIRST, None))
    p = processing()
    caches.bind(p, key(first, hires))
    assert p.cached_c == [None, None] and p.cached_c is not before.cached_c
    assert p.cached_hr_uc == [None, None]


def test_img2img_binds_no_hires_caches(job_start: Any) -> None:
    caches, key = caches_and_key(job_start)
    p = processing(hires=False)
    caches.bind(p, key(FIRST, None))
    assert p.cached_c == [None, None] and not hasattr(p, "cached_hr_c")
