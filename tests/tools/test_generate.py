"""`python -m lib_klora generate`: every option is checked before anything is loaded (exit code 2)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from lib_klora.tools import generate
from lib_klora.tools.cli import build_parser, main


class Loaded(Exception):
    """Raised by the stand-in loader: the options got as far as loading the model."""


@pytest.fixture
def setup(lora_pair, tmp_path: Path, monkeypatch) -> dict[str, Path]:
    def load(args):
        raise Loaded(args.model)

    monkeypatch.setattr(generate, "load_pipeline", load)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    png = tmp_path / "ref.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "pickle.ckpt").write_bytes(b"\x80\x04")
    return {"model": model, "png": png, "tmp": tmp_path, "subject": lora_pair[0], "style": lora_pair[1]}


def _argv(setup: dict[str, Path], *extra: str) -> list[str]:
    model = ["--model", str(setup["model"])] if "--model" not in extra else []
    return ["generate", str(setup["subject"]), str(setup["style"]), *model, "--prompt", "p", *extra]


BAD = [
    (("--apply-to", "weights", "--method", "dynamic"), "apply_to='activations'"),
    (("--width", "20"), "--width must be a multiple of 8"),
    (("--height", "0"), "--height must be a multiple of 8"),
    (("--guidance-scale", "nan"), "--guidance-scale"),
    (("--guidance-scale", "-1"), "--guidance-scale"),
    (("--image-seed", "-1"), "--image-seed"),
    (("--out", "{tmp}/image.txt"), "--out"),
    (("--map", "{tmp}"), "--map"),
    (("--alpha", "-1"), "alpha"),
    (("--subject-strength", "9"), "subject_strength"),
    (("--style-ref", "{tmp}/missing.png"), "reference image not found"),
    (("--style-ref", "{tmp}/notes.txt"), "notes.txt"),
    (("--style-ref", "{png}", "--guidance-decoder", "taesd"), "--weights-dir"),
    (("--weights-dir", "{tmp}/notes.txt"), "--weights-dir"),
    (("--config", "{tmp}/nowhere"), "--config"),
    (("--device", "warp:9"), "--device"),
    (("--model", "{tmp}/pickle.ckpt"), "pickle"),
    (("--model", "{tmp}"), "model_index.json"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(extra) for extra, _ in BAD])
def test_a_bad_option_exits_2_with_a_message_before_anything_loads(setup, capsys, extra, message):
    values = {key: str(path) for key, path in setup.items()}
    argv = _argv(setup, *(part.format(**values) for part in extra))
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [("--apply-to", "fast"), ("--guidance-decoder", "big"), ("--dtype", "fp8")])
def test_a_value_outside_an_option_s_choices_is_an_argparse_error(setup, capsys, extra):
    with pytest.raises(SystemExit) as refused:
        main(_argv(setup, *extra))
    assert refused.value.code == 2 and extra[0] in capsys.readouterr().err


def test_good_options_reach_the_loader_with_every_setting(setup):
    extra = [
        "--apply-to",
        "weights",
        "--method",
        "klora",
        "--pattern",
        "s*",
        "--width",
        "64",
        "--height",
        "32",
    ]
    extra += ["--guidance-scale", "0", "--image-seed", "4294967295", "--out", str(setup["tmp"] / "a.webp")]
    extra += [
        "--style-ref",
        str(setup["png"]),
        "--guidance-decoder",
        "taesd",
        "--weights-dir",
        str(setup["tmp"]),
    ]
    with pytest.raises(Loaded):
        main(_argv(setup, *extra))
    params = generate.check_options(build_parser().parse_args(_argv(setup, *extra)))
    assert params.uses_guidance and params.guidance_decoder == "taesd" and params.pattern == "s*"
    reference = base64.b64decode(params.style_refs[0])
    assert Image.open(io.BytesIO(reference)).size == (8, 8)


def test_apply_to_has_a_help_text_naming_both_modes():
    assert "activations" in generate.APPLY_TO_HELP and "weights" in generate.APPLY_TO_HELP
    from lib_klora.engines.torch_module import APPLY_TO

    assert generate.APPLY_TO_CHOICES == APPLY_TO
