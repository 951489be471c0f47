"""`python -m lib_klora demo`: the main job end to end with no downloads.

With the trained toy world shipped in lib_klora/tools/world (and diffusers/transformers installed), the demo
draws one subject × style pair with each LoRA alone, stacked, K-LoRA and `dynamic`, puts K-LoRA's selection
map beside the grid and prints the judges' verdicts. It always also writes two SD1.5-shaped synthetic LoRAs
in different file formats, their fusion plans for patterns s and s*, and their selection maps.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from lib_klora.fusion.from_files import plan_from_files
from lib_klora.fusion.plan import PlanSettings
from lib_klora.fusion.selection_map import save_selection_map
from lib_klora.tools.synthetic import depth_gain, make_lora_tensors, unet_layer_shapes, write_lora


def write_demo_loras(out: Path) -> tuple[Path, Path]:
    """An SD1.5-shaped subject LoRA (kohya format, rank 8, stronger in the encoder) and style LoRA
    (the official K-LoRA script's diffusers format, rank 16, stronger in the decoder): two formats that
    must pair up layer by layer."""
    shapes = unet_layer_shapes("sd15")
    subject = make_lora_tensors(
        shapes, 8, seed=1, key_format="kohya", alpha=4.0, layer_gain=depth_gain("down")
    )
    style = make_lora_tensors(shapes, 16, seed=2, key_format="diffusers", layer_gain=depth_gain("up"))
    meta = {"ss_base_model_version": "sd_v1"}
    return (
        write_lora(out / "demo_subject.safetensors", subject, meta),
        write_lora(out / "demo_style.safetensors", style),
    )


def _say(quiet: bool) -> Callable[[str], None]:
    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    return say


def run_demo(out: Path, steps: int = 30, quiet: bool = False, world_steps: int = 20) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    say = _say(quiet)
    written: dict[str, Path] = {}
    from lib_klora.tools.world.demo_grid import run_world_demo, world_available

    why_not = world_available()
    if why_not is None:
        say("drawing the world demo (each LoRA alone, stacked, K-LoRA, dynamic) ...")
        world_files, verdicts = run_world_demo(out, steps=world_steps, progress=say)
        written.update(world_files)
        if not quiet:
            print("\n".join(verdicts))
    else:
        say(f"skipping the picture demo: {why_not}")
    say("planning two synthetic SD1.5-shaped LoRAs ...")
    subject, style = write_demo_loras(out)
    written.update(subject=subject, style=style)
    for pattern in ("s", "s*"):
        plan = plan_from_files(subject, style, PlanSettings(pattern=pattern))
        tag = "s" if pattern == "s" else "s_star"
        json_path = out / f"plan_{tag}.json"
        json_path.write_text(json.dumps(plan.to_json(steps), indent=1))
        schedule = plan.schedule(steps)
        png_path = save_selection_map(
            out / f"selection_map_{tag}.png",
            plan.layer_names,
            schedule.choices.tolist(),
            schedule.labels,
            f"{subject.name} + {style.name}: {plan.title()}",
        )
        written[f"plan_{tag}"], written[f"map_{tag}"] = json_path, png_path
        if not quiet:
            print(f"== pattern {pattern} ==\n{plan.summary(steps)}")
    if not quiet:
        for name, path in written.items():
            print(f"{name:>12}: {path}")
    return written
