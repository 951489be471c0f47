"""Command line: `python -m lib_klora plan|demo|eval|generate`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lib_klora import __version__
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import plan_from_files
from lib_klora.fusion.options import MAX_STEPS, PLANNED_METHODS, GammaVariant, Pattern
from lib_klora.fusion.plan import PlanSettings
from lib_klora.fusion.schedule import DEFAULT_ALPHA
from lib_klora.fusion.selection_map import save_selection_map


class ProgressBar:
    """A one-line progress bar on stderr, shown only when scoring takes a noticeable time."""

    def __init__(self, label: str, enabled: bool = True, delay_s: float = 0.5, width: int = 30) -> None:
        self.label, self.enabled, self.delay_s, self.width = label, enabled, delay_s, width
        self.start = time.perf_counter()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or (
            not self.shown and time.perf_counter() - self.start < self.delay_s and done < total
        ):
            return
        self.shown = True
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{self.label} [{bar}] {done}/{total} layers{end}")
        sys.stderr.flush()


def _settings(args: argparse.Namespace) -> PlanSettings:
    return PlanSettings(
        method=args.method,
        pattern=args.pattern,
        alpha=args.alpha,
        beta=args.beta,
        gamma=args.gamma,
        strengths=(args.subject_strength, args.style_strength),
        seed=args.seed,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    cache = ScoreCache(directory=args.cache_dir) if args.cache_dir else None
    progress = ProgressBar("scoring", enabled=not args.quiet)
    plan = plan_from_files(
        args.subject, args.style, _settings(args), device=args.device, cache=cache, progress=progress
    )
    document = plan.to_json(args.steps)
    if args.json == "-":
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(document, indent=1))
    if args.png:
        schedule = plan.schedule(args.steps)
        save_selection_map(
            args.png, plan.layer_names, schedule.choices.tolist(), schedule.labels, plan.title()
        )
    if not args.quiet and args.json != "-":
        print(plan.summary(args.steps))
        for what, target in (("plan", args.json), ("selection map", args.png)):
            if target:
                print(f"wrote {what}: {target}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lib_klora.tools.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, quiet=args.quiet)
    return 0


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"slope of the time scale (default {DEFAULT_ALPHA:g})",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="offset of the time scale (default 0.5 for s, 1.3 for s*; 1.275 = official code's s*)",
    )
    parser.add_argument("--pattern", choices=[p.value for p in Pattern], default="s")
    parser.add_argument(
        "--gamma",
        choices=[g.value for g in GammaVariant],
        default="official",
        help="balance factor: official code (trimmed mean of layer ratios) or paper (L1 ratio)",
    )
    parser.add_argument(
        "--method",
        choices=[m.value for m in PLANNED_METHODS],
        default="klora",
        help="klora, or a baseline: merge (both always), fixed (time only), random (1/3 subject)",
    )
    parser.add_argument("--subject-strength", type=float, default=1.0)
    parser.add_argument("--style-strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument(
        "--device", default="auto", help="where to score: auto (CUDA if present), cpu, cuda:0 ..."
    )
    parser.add_argument("--cache-dir", default=None, help="keep scores on disk here (keyed by file content)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lib_klora", description="K-LoRA: fuse a subject and a style LoRA"
    )
    parser.add_argument("--version", action="version", version=f"sd-webui-klora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="compute which LoRA each layer uses at each step")
    plan.add_argument("subject", help="subject (content) LoRA, .safetensors")
    plan.add_argument("style", help="style LoRA, .safetensors")
    plan.add_argument("--steps", type=int, required=True, help="sampling steps")
    plan.add_argument("--json", help="write the plan as JSON here ('-' for stdout)")
    plan.add_argument("--png", help="write the selection map (layers x steps) here")
    _add_plan_options(plan)
    plan.set_defaults(func=cmd_plan)

    demo = sub.add_parser("demo", help="write two synthetic LoRAs and their plan and map (no downloads)")
    demo.add_argument("--out", default="klora-demo", help="output folder (default ./klora-demo)")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    from lib_klora.tools.evaluate import add_eval_parser  # imports no model library until the command runs

    add_eval_parser(sub)
    from lib_klora.tools.generate import add_generate_parser  # diffusers is imported only when it runs

    add_generate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    steps = getattr(args, "steps", 1)
    if not 1 <= steps <= MAX_STEPS:
        parser.error(f"--steps must be an integer from 1 to {MAX_STEPS} (the API's limit too), got {steps}")
    try:
        return args.func(args)
    except ValueError as exc:  # KLoraError (bad files) and invalid settings alike
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:  # e.g. an output folder that cannot be written
        print(f"error: {exc}", file=sys.stderr)
    return 2
