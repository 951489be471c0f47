"""The Table 1 metrics and the ``eval`` command, with randomly initialised encoders (no downloads)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")
pytest.importorskip("timm")

from lib_klora.errors import KLoraError
from lib_klora.tools.evaluate import (
    RANDOM_NOTE,
    add_eval_parser,
    build_eval_encoders,
    cmd_eval,
    collect_images,
    evaluate,
    list_images,
    load_image,
)

# The smallest real architectures keep this quick; the command's defaults are ViT-L-14 and ViT-S/16.
CLIP = "ViT-B-32"
DINO = "vit_small_patch16_224.dino"
FAST = [
    "--clip",
    "ViT-S-32",
    "--dino",
    DINO,
    "--device",
    "cpu",
    "--random-weights",
]  # the command builds its own


def _write(path: Path, seed: int, size: tuple[int, int] = (72, 64)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def encoders():
    return build_eval_encoders(CLIP, DINO, pretrained=False, device="cpu")


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    subject, style, out = tmp_path / "subject", tmp_path / "style", tmp_path / "out"
    for d in (subject, style, out):
        d.mkdir()
    _write(subject / "a.png", 1)
    _write(subject / "b.jpg", 2, (50, 80))
    _write(style / "s.png", 3)
    _write(out / "g0.png", 4)
    _write(out / "g1.png", 5)
    (out / "notes.txt").write_text("ignored: not an image suffix")
    return subject, style, out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klora")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_metrics_follow_the_protocol(encoders, folders: tuple[Path, Path, Path]) -> None:
    subject, style, out = folders
    gen = sorted(out.glob("*.png"))
    res = evaluate(gen, list_images(subject), list_images(style), encoders=encoders)
    assert res["counts"] == {"images": 2, "subject_refs": 2, "style_refs": 1}
    assert res["random_weights"] is True and res["note"] == RANDOM_NOTE
    # Recompute by hand: cosine ×100 averaged over all (image, reference) pairs.
    clip, dino = encoders
    imgs = [load_image(p) for p in gen]
    subj = [load_image(p) for p in list_images(subject)]
    sty = [load_image(p) for p in list_images(style)]
    gen_clip = clip.embed_pil(imgs)
    expect = {
        "style_sim": (gen_clip @ clip.embed_pil(sty).T).mean() * 100,
        "clip_i": (gen_clip @ clip.embed_pil(subj).T).mean() * 100,
        "dino": (dino.embed_pil(imgs) @ dino.embed_pil(subj).T).mean() * 100,
    }
    for key, value in expect.items():
        assert res[key] == pytest.approx(float(value), abs=1e-3)
        assert np.mean([row[key] for row in res["per_image"]]) == pytest.approx(res[key], abs=1e-3)
    # An image compared with itself scores 100.
    same = evaluate([gen[0]], [gen[0]], [gen[0]], encoders=encoders)
    for key in ("style_sim", "clip_i", "dino"):
        assert same[key] == pytest.approx(100.0, abs=1e-3)


def test_eval_command_prints_table_and_json(folders, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    subject, style, out = folders
    report = tmp_path / "report.json"
    args = _parser().parse_args(
        [
            "eval",
            str(out),
            "--subject-refs",
            str(subject),
            "--style-refs",
            str(style),
            *FAST,
            "--json",
            str(report),
        ]
    )
    assert args.func is cmd_eval
    assert cmd_eval(args) == 0
    table = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in table and "Style Sim" in table and "CLIP-I" in table and "DINO" in table
    assert "g0.png" in table and "g1.png" in table
    data = json.loads(report.read_text())
    assert data["random_weights"] is True and data["counts"]["images"] == 2
    assert data["models"] == {"clip": "ViT-S-32", "dino": DINO}

    # --json - : machine-readable stdout, the table goes to stderr.
    args = _parser().parse_args(
        [
            "eval",
            str(out / "g0.png"),
            "--subject-refs",
            str(subject),
            "--style-refs",
            str(style),
            *FAST,
            "--json",
            "-",
        ]
    )
    assert cmd_eval(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["counts"]["images"] == 1
    assert "RANDOM WEIGHTS" in captured.err


def test_eval_errors(folders, tmp_path: Path) -> None:
    subject, style, out = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--subject-refs", str(subject), "--style-refs", str(style), "--random-weights"]

    def run(argv: list[str]) -> int:
        return cmd_eval(_parser().parse_args(["eval", *argv]))

    with pytest.raises(KLoraError, match="no images given"):
        run(base)
    with pytest.raises(KLoraError, match=f"subject reference folder has no images.*{empty.name}"):
        run([str(out), "--subject-refs", str(empty), "--style-refs", str(style), "--random-weights"])
    with pytest.raises(KLoraError, match="style reference folder not found"):
        run(
            [
                str(out),
                "--subject-refs",
                str(subject),
                "--style-refs",
                str(tmp_path / "nope"),
                "--random-weights",
            ]
        )
    with pytest.raises(KLoraError, match="generated-image folder has no images"):
        run([str(empty), *base])
    with pytest.raises(KLoraError, match="image not found"):
        run([str(tmp_path / "missing.png"), *base])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but truncated")
    with pytest.raises(KLoraError, match=r"cannot read image .*broken\.png"):
        run([str(broken), *base])


def test_library_level_checks(encoders) -> None:
    with pytest.raises(KLoraError, match="no images to evaluate"):
        evaluate([], [Image.new("RGB", (8, 8))], [], encoders=encoders)
    with pytest.raises(KLoraError, match="no reference images"):
        evaluate([Image.new("RGB", (8, 8))], [], [], encoders=encoders)
    only_style = evaluate(
        [Image.new("RGB", (40, 40), "red")], [], [Image.new("RGB", (40, 40))], encoders=encoders
    )
    assert only_style["clip_i"] is None and only_style["dino"] is None and only_style["style_sim"] is not None
    with pytest.raises(KLoraError, match="no images given"):
        collect_images([])
    with pytest.raises(KLoraError, match="MODEL:PRETRAINED"):
        build_eval_encoders("ViT-S-32", DINO, pretrained=True)


def test_random_encoders_are_reproducible() -> None:
    state = torch.get_rng_state()
    a, _ = build_eval_encoders("ViT-S-32", DINO, pretrained=False)
    b, _ = build_eval_encoders("ViT-S-32", DINO, pretrained=False)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    x = next(iter(a.model.parameters()))
    assert torch.equal(x, next(iter(b.model.parameters())))
