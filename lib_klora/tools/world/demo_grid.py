"""The picture part of `python -m lib_klora demo`: one subject × style pair of the trained world, drawn by
each LoRA alone, stacked, K-LoRA and `dynamic`, with K-LoRA's selection map beside the grid and the
judges' verdicts (all through the same engine the fidelity benchmark uses)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

DEMO_METHODS = ("subject_only", "style_only", "stacked", "klora_s", "dynamic")
DEMO_PAIR = ("sks", "plk")
DEMO_SEEDS = tuple(range(30_000, 30_008))


def world_available(weights_dir: Path | None = None) -> str | None:
    """None when the world demo can run; otherwise why not (a sentence for the user)."""
    import importlib.util

    for package in ("diffusers", "transformers"):
        if importlib.util.find_spec(package) is None:
            return f"the picture demo needs {package} (pip install diffusers transformers)"
    folder = Path(weights_dir) if weights_dir else Path(__file__).parent / "weights"
    needed = [
        "manifest.json",
        "base_unet.safetensors",
        "judge_object.safetensors",
        "image_encoder.safetensors",
    ]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        return f"the world's weights are missing in {folder} ({', '.join(missing)})"
    return None


def run_world_demo(
    out: Path, steps: int = 20, progress: Callable[[str], None] | None = None
) -> tuple[dict[str, Path], list[str]]:
    """Draw the demo grid and its selection map into `out`; return the files and the judges' verdicts."""
    from lib_klora.tools.world import fidelity as F  # torch, diffusers: only once the demo runs

    world = F.World.load()
    result = F.run_fidelity(
        world,
        seeds=DEMO_SEEDS,
        steps=steps,
        methods=DEMO_METHODS,
        subjects=(DEMO_PAIR[0],),
        styles=(DEMO_PAIR[1],),
        keep_images=len(DEMO_SEEDS),
        progress=progress,
    )
    (sheet_path,) = F.save_sheets(result, DEMO_METHODS, out, scale=4)
    selection_map = result.maps[DEMO_PAIR]
    sheet = Image.open(sheet_path)
    height = max(sheet.height, selection_map.height)
    combined = Image.new("RGB", (sheet.width + 16 + selection_map.width, height), (255, 255, 255))
    combined.paste(sheet, (0, 0))
    combined.paste(selection_map, (sheet.width + 16, 0))
    grid_path = out / "world_demo.png"
    combined.save(grid_path)
    map_path = out / "world_selection_map.png"
    selection_map.save(map_path)
    subject, style = DEMO_PAIR
    verdicts = [f"prompt {F.R.caption(subject, style)!r}, {len(DEMO_SEEDS)} seeds, {steps} steps:"]
    for method in DEMO_METHODS:
        score = result.per_pair[DEMO_PAIR][method]
        verdicts.append(
            f"  {method:>13}: the judges see the subject in {score.subject:.0%}, "
            f"the style in {score.style:.0%}, both in {score.both:.0%}"
        )
    return {"world_grid": grid_path, "world_map": map_path, "world_sheet": sheet_path}, verdicts
