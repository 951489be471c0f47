from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from lib_klora.loras.safetensors_header import pickle_refusal
from lib_klora.tools.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_plan_writes_contract_json_and_png(lora_pair, tmp_path: Path, capsys) -> None:
    subject, style = lora_pair
    out_json, out_png = tmp_path / "plan.json", tmp_path / "map.png"
    code = main(
        [
            "plan",
            str(subject),
            str(style),
            "--steps",
            "20",
            "--pattern",
            "s*",
            "--beta",
            "1.275",
            "--json",
            str(out_json),
            "--png",
            str(out_png),
            "--quiet",
        ]
    )
    assert code == 0
    document = json.loads(out_json.read_text())
    assert document["steps"] == 20 and document["beta"] == 1.275 and document["alpha"] == 1.5
    assert all(len(layer["choices"]) == 20 for layer in document["layers"])
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.width > 100


def test_plan_json_to_stdout(lora_pair, capsys) -> None:
    assert main(["plan", *map(str, lora_pair), "--steps", "3", "--json", "-", "--method", "merge"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["layers"][0]["choices"] == ["both", "both", "both"]


def test_bad_file_gives_exit_2_and_a_clear_message(lora_pair, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"\x80\x04junk")
    assert main(["plan", str(bad), str(lora_pair[1]), "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.ckpt" in err and pickle_refusal(bad) in err
    assert "Traceback" not in err


def test_module_entry_point_and_demo(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lib_klora", "demo", "--out", str(tmp_path / "demo"), "--steps", "12"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {
        "demo_subject.safetensors",
        "demo_style.safetensors",
        "plan_s.json",
        "selection_map_s.png",
        "plan_s_star.json",
        "selection_map_s_star.png",
    } <= names
    plan = json.loads((tmp_path / "demo" / "plan_s.json").read_text())
    choices = {c for layer in plan["layers"] for c in layer["choices"]}
    assert choices == {"subject", "style"}


def test_bad_steps_is_a_usage_error(lora_pair) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lib_klora", "plan", *map(str, lora_pair), "--steps", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--steps must be an integer from 1 to 1000" in result.stderr


def test_steps_have_the_apis_limit(lora_pair, capsys) -> None:
    import pytest

    for steps in ("0", "1001", "1000000000"):
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", *map(str, lora_pair), "--steps", steps])
        assert exit_info.value.code == 2
        assert "--steps must be an integer from 1 to 1000" in capsys.readouterr().err
    assert main(["plan", *map(str, lora_pair), "--steps", "1000", "--quiet"]) == 0


def test_eval_offline_without_weights_dir_names_the_flag(tmp_path: Path, capsys) -> None:
    (tmp_path / "refs").mkdir()
    code = main(
        ["eval", "--offline", "--subject-refs", str(tmp_path / "refs"), "--style-refs", str(tmp_path)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--offline needs --weights-dir DIR" in err and "weights_dir" not in err.replace(
        "--weights-dir", ""
    )


def test_plan_reads_a_lycoris_style_loha_pair(tmp_path: Path, capsys) -> None:
    """The CLI reads LoHa files (it refused them with "no 'up' weight") and prints K-LoRA's summary."""
    import torch
    from safetensors.torch import save_file

    paths = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        tensors = {
            f"{stem}.hada_w{h}_{p}": torch.randn(*s, generator=g)
            for h in "12"
            for p, s in (("a", (32, 2)), ("b", (2, 32)))
        }
        tensors[f"{stem}.alpha"] = torch.tensor(2, dtype=torch.int64)
        paths.append(tmp_path / f"loha{seed}.safetensors")
        save_file(tensors, str(paths[-1]))
    assert main(["plan", *map(str, paths), "--steps", "4", "--json", "-"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["layers"][0]["k"] == 16  # LoHa rank bound 2·2 per LoRA, K = 4·4


def _actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield parser.prog, action


def test_every_option_of_every_command_has_help() -> None:
    from lib_klora.tools.cli import build_parser

    missing = [f"{prog} {action.dest}" for prog, action in _actions(build_parser()) if not action.help]
    assert missing == []


def test_progress_in_a_log_is_a_line_every_few_seconds(monkeypatch, capsys) -> None:
    from lib_klora.tools import cli

    clock = iter([0.0, 1.0, 2.0, 7.0, 8.0, 20.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    bar = cli.ProgressBar("scoring", delay_s=0.5, log_every_s=5.0, terminal=False)  # start: t=0
    for done in (1, 2, 3, 4, 5):  # t = 1, 2, 7, 8, 20
        bar(done, 5)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["scoring: 1/5 layers (1 s)", "scoring: 3/5 layers (7 s)", "scoring: 5/5 layers (20 s)"]
    assert "\r" not in "".join(lines)
