from __future__ import annotations

from pathlib import Path

import pytest

from lib_klora.fusion import from_files as engine
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import plan_from_files
from lib_klora.fusion.scores import SCORER_VERSION
from lib_klora.tools.synthetic import make_lora_tensors, write_lora
from tests.conftest import SMALL_SHAPES


def _forbid_reading(monkeypatch) -> None:
    def fail(path):
        raise AssertionError(f"the cache should have answered without reading {path}")

    monkeypatch.setattr(engine, "read_lora_file", fail)


def test_second_plan_is_a_cache_hit(lora_pair, cache, monkeypatch) -> None:
    first = plan_from_files(*lora_pair, cache=cache)
    assert cache.misses == 1 and cache.hits == 0
    _forbid_reading(monkeypatch)
    second = plan_from_files(*lora_pair, cache=cache)
    assert cache.hits == 1
    assert second.table is first.table


def test_strength_changes_reuse_scores(lora_pair, cache, monkeypatch) -> None:
    from lib_klora.fusion.plan import PlanSettings

    first = plan_from_files(*lora_pair, cache=cache)
    _forbid_reading(monkeypatch)
    stronger = plan_from_files(*lora_pair, PlanSettings(strengths=(2.0, 1.0)), cache=cache)
    assert stronger.to_json(3)["layers"][0]["score_subject"] == pytest.approx(
        2 * first.to_json(3)["layers"][0]["score_subject"]
    )


def test_changed_content_at_same_path_is_rescored(lora_pair, cache) -> None:
    subject, style = lora_pair
    first = plan_from_files(subject, style, cache=cache)
    write_lora(style, make_lora_tensors(SMALL_SHAPES, 8, seed=99, key_format="diffusers"))
    second = plan_from_files(subject, style, cache=cache)
    assert cache.misses == 2
    assert second.table.layers[0].scores[1] != first.table.layers[0].scores[1]


def test_same_content_under_another_name_hits(lora_pair, cache, tmp_path: Path) -> None:
    subject, style = lora_pair
    plan_from_files(subject, style, cache=cache)
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(style.read_bytes())
    plan_from_files(subject, copy, cache=cache)
    assert cache.hits == 1


def test_memory_bound(tmp_path: Path) -> None:
    cache = ScoreCache(max_entries=2)
    subject = write_lora(tmp_path / "s.safetensors", make_lora_tensors(SMALL_SHAPES, 2, seed=0))
    for seed in range(4):
        style = write_lora(
            tmp_path / f"t{seed}.safetensors", make_lora_tensors(SMALL_SHAPES, 2, seed=seed + 1)
        )
        plan_from_files(subject, style, cache=cache)
    assert len(cache) == 2


def test_disk_cache_survives_a_new_process(lora_pair, tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "cache"
    first = plan_from_files(*lora_pair, cache=ScoreCache(directory=directory))
    assert any(directory.glob(f"*-v{SCORER_VERSION}.json")) and (directory / "digests.json").is_file()
    _forbid_reading(monkeypatch)  # a fresh cache object, as in a new process: digests and scores from disk
    fresh = ScoreCache(directory=directory)
    again = plan_from_files(*lora_pair, cache=fresh)
    assert fresh.hits == 1
    assert again.to_json(5) == first.to_json(5)


def test_corrupt_disk_entry_is_recomputed(lora_pair, tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    plan_from_files(*lora_pair, cache=ScoreCache(directory=directory))
    for entry in directory.glob(f"*-v{SCORER_VERSION}.json"):
        entry.write_text("{broken")
    fresh = ScoreCache(directory=directory)
    plan_from_files(*lora_pair, cache=fresh)
    assert fresh.misses == 1
