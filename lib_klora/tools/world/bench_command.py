"""`python -m lib_klora world bench` and `bench/fidelity.py`: run the fidelity benchmark and report it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lib_klora.tools.world.methods import METHODS

DEFAULT_SEEDS = 64
SEED0 = 20_000  # distinct from the validity seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="seeds per pair (default 64)")
    parser.add_argument("--steps", type=int, default=25, help="ancestral DDPM sampler steps (default 25)")
    parser.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (default 4)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        metavar="METHOD",
        help=f"methods to run (default all: {', '.join(METHODS)})",
    )
    parser.add_argument("--out", type=Path, default=Path("fidelity-out"), help="folder for sheets and JSON")
    parser.add_argument("--weights", type=Path, default=None, help="world weights folder (default: shipped)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")


def run(args: argparse.Namespace) -> int:
    import torch

    from lib_klora.tools.world import fidelity as F

    if not 1 <= args.seeds <= 4096:
        raise SystemExit("--seeds must be 1 to 4096")
    if not 1 <= args.steps <= 1000:
        raise SystemExit("--steps must be 1 to 1000")
    torch.set_num_threads(args.threads)
    try:
        world = F.World.load(args.weights)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest_path = (args.weights or Path(F.__file__).parent / "weights") / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    world_valid = manifest.get("validity", {}).get("world_valid")

    def progress(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    seeds = list(range(SEED0, SEED0 + args.seeds))
    result = F.run_fidelity(
        world, seeds=seeds, steps=args.steps, cfg=args.cfg, methods=args.methods, progress=progress
    )
    sheets = F.save_sheets(result, args.methods, args.out)
    report = {
        "protocol": {
            "seeds": args.seeds,
            "seed0": SEED0,
            "steps": args.steps,
            "cfg": args.cfg,
            "sampler": "DDPM ancestral (trailing, x0 clipped)",
        },
        "world_valid": world_valid,
        "methods": {m: vars(result.mean(m)) for m in args.methods},
        "pairs": {
            f"{s}+{t}": {m: vars(v) for m, v in row.items()} for (s, t), row in result.per_pair.items()
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=1))
    for (subject, style), image in result.maps.items():
        image.save(args.out / f"selection_map_{subject}_{style}.png")
    print(F.table(result, args.methods))
    print(f"sheets: {', '.join(str(p) for p in sheets)}")
    print(F.result_line(result, world_valid))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/fidelity.py", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
