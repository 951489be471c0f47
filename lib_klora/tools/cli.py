"""Command line: `python -m lib_klora plan|demo|eval|generate`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lib_klora import __version__
from lib_klora.engines.module_targets import module_base_weights
from lib_klora.fusion.cache import ScoreCache
from lib_klora.fusion.from_files import plan_from_files
from lib_klora.fusion.options import MAX_STEPS, PLANNED_METHODS, GammaVariant, Pattern
from lib_klora.fusion.plan import PlanSettings
from lib_klora.fusion.schedule import DEFAULT_ALPHA
from lib_klora.fusion.selection_map import save_selection_map
from lib_klora.loras.oft import BaseWeights


class ProgressBar:
    """Progress on stderr, shown only when scoring takes a noticeable time: a one-line bar on a terminal, and
    a plain line every `log_every_s` seconds (plus the last) when stderr is a log file or a pipe."""

    def __init__(
        self,
        label: str,
        enabled: bool = True,
        delay_s: float = 0.5,
        width: int = 30,
        log_every_s: float = 5.0,
        terminal: bool | None = None,
    ) -> None:
        self.label, self.enabled, self.delay_s, self.width = label, enabled, delay_s, width
        self.log_every_s = log_every_s
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.start = time.perf_counter()
        self.shown = False
        self.last_line = float("-inf")

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (not self.shown and now - self.start < self.delay_s and done < total):
            return
        self.shown = True
        if not self.terminal:
            if done >= total or now - self.last_line >= self.log_every_s:
                self.last_line = now
                sys.stderr.write(f"{self.label}: {done}/{total} layers ({now - self.start:.0f} s)\n")
                sys.stderr.flush()
            return
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


def _base_weights(args: argparse.Namespace) -> BaseWeights | None:
    """`--model`'s layer weights for OFT/BOFT layers; the model is loaded only if a file has such a layer."""
    if not args.model:
        return None

    def components() -> dict:
        from lib_klora.diffusers import pipeline_components
        from lib_klora.tools.generate import load_pipeline

        options = {"pipeline": args.pipeline, "config": args.config, "dtype": "fp32", "allow_download": False}
        return pipeline_components(load_pipeline(argparse.Namespace(model=args.model, **options)))

    model = Path(args.model).resolve()
    stamp = model.stat().st_mtime_ns if model.exists() else 0
    return module_base_weights(components, f"model:{model}:{args.pipeline}:{stamp}")


def cmd_plan(args: argparse.Namespace) -> int:
    cache = ScoreCache(directory=args.cache_dir) if args.cache_dir else None
    progress = ProgressBar("scoring", enabled=not args.quiet)
    plan = plan_from_files(
        args.subject,
        args.style,
        _settings(args),
        device=args.device,
        cache=cache,
        progress=progress,
        base_weights=_base_weights(args),
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
        title = f"{Path(args.subject).name} + {Path(args.style).name}: {plan.title()}"
        save_selection_map(args.png, plan.layer_names, schedule.choices.tolist(), schedule.labels, title)
    if not args.quiet and args.json != "-":
        print(plan.summary(args.steps))
        for what, target in (("plan", args.json), ("selection map", args.png)):
            if target:
                print(f"wrote {what}: {target}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lib_klora.tools.demo import run_demo

    for flag, value in (("--steps", args.steps), ("--world-steps", args.world_steps)):
        if not 1 <= value <= 1000:
            print(f"error: {flag} must be 1 to 1000, got {value}", file=sys.stderr)
            return 2
    run_demo(Path(args.out), steps=args.steps, quiet=args.quiet, world_steps=args.world_steps)
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
    parser.add_argument(
        "--pattern",
        choices=[p.value for p in Pattern],
        default="s",
        help="time scale: s (subject early, style late; the paper) or s* (style first; recommended for FLUX)",
    )
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
    parser.add_argument(
        "--subject-strength", type=float, default=1.0, help="multiplier of the subject LoRA's ΔW (default 1)"
    )
    parser.add_argument(
        "--style-strength", type=float, default=1.0, help="multiplier of the style LoRA's ΔW (default 1)"
    )
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
    plan.add_argument(
        "--steps", type=int, required=True, help="sampling steps of the generation the plan is for (1-1000)"
    )
    plan.add_argument("--json", help="write the plan as JSON here ('-' for stdout)")
    plan.add_argument("--png", help="write the selection map (layers x steps) here")
    plan.add_argument(
        "--model",
        metavar="DIR_OR_FILE",
        help="base model (diffusers folder or .safetensors checkpoint, local files only) whose weights "
        "OFT/BOFT layers rotate; loaded only when a file has such layers",
    )
    plan.add_argument(
        "--pipeline",
        choices=("sd", "sdxl", "flux"),
        default="sd",
        help="--model's type when it is a single file",
    )
    plan.add_argument("--config", metavar="DIR", help="local diffusers config for a single-file --model")
    _add_plan_options(plan)
    plan.set_defaults(func=cmd_plan)

    demo = sub.add_parser(
        "demo",
        help="draw one subject × style pair of the trained toy world with every kind of fusion, and plan two "
        "synthetic SD1.5 LoRAs (no downloads)",
    )
    demo.add_argument("--out", default="klora-demo", help="output folder (default ./klora-demo)")
    demo.add_argument(
        "--steps", type=int, default=30, help="sampling steps of the synthetic LoRAs' plans (default 30)"
    )
    demo.add_argument(
        "--world-steps", type=int, default=20, help="sampler steps of the world's pictures (default 20)"
    )
    demo.add_argument("--quiet", action="store_true", help="print nothing but errors")
    demo.set_defaults(func=cmd_demo)

    from lib_klora.tools.evaluate import add_eval_parser  # imports no model library until the command runs

    add_eval_parser(sub)
    from lib_klora.tools.generate import add_generate_parser  # diffusers is imported only when it runs

    add_generate_parser(sub)
    world = sub.add_parser("world", help="the trained toy world: the fidelity benchmark")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    bench = world_sub.add_parser(
        "bench", help="judge subject, style and both for every method on every world pair (bench/fidelity.py)"
    )
    from lib_klora.tools.world import bench_command  # torch-free until the command runs

    bench_command.add_arguments(bench)
    bench.set_defaults(func=bench_command.run)
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
