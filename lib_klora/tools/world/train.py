"""Reproducible training of the world: base model, LoRAs, judges and the contrastive image encoder.

    python -m lib_klora.tools.world.train --all --seed 0

writes everything under ``lib_klora/tools/world/weights/`` (fp16 safetensors + ``manifest.json``). Training
runs on one CPU thread by default (``--threads``) so the same command gives the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib_klora.tools.world import render as R
from lib_klora.tools.world.model import (
    WorldConfig,
    WorldTokenizer,
    build_text_encoder,
    build_unet,
    diffusion_loss,
    save_module,
    to_model,
    train_scheduler,
)

WEIGHTS = Path(__file__).parent / "weights"


def log(msg: str, file=None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=file or sys.stderr, flush=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_manifest(d: Path = WEIGHTS) -> dict:
    p = d / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def save_manifest(manifest: dict, d: Path = WEIGHTS) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def update_manifest(d: Path, update) -> None:
    """Read-modify-write the manifest under a lock (several trainings may run side by side)."""
    import fcntl

    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = load_manifest(d)
        update(manifest)
        save_manifest(manifest, d)


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


# --- diffusion training ------------------------------------------------------------------------------------


@dataclass
class DiffusionTrain:
    steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    caption_dropout: float = 0.1
    ema: float = 0.999
    min_snr: float = 5.0
    n_images: int = 20000


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


def train_base(
    cfg: WorldConfig,
    tc: DiffusionTrain,
    seed: int,
    out_dir: Path | None = WEIGHTS,
    log_every: int = 50,
    checkpoint_every: int = 500,
    stop_at: int | None = None,
) -> dict:
    """Train the base UNet + text encoder on generic objects × generic styles; returns stats."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tok = WorldTokenizer()
    unet, te = build_unet(cfg), build_text_encoder(cfg, tok)
    sched = train_scheduler(cfg)
    t0 = time.time()
    data = R.render_set(None, tc.n_images, seed=seed + 1)
    x_all = to_model(data.images, cfg.patch)
    ids_all = tok(data.captions)
    empty = tok([""])[0]
    log(f"rendered {tc.n_images} images in {time.time() - t0:.1f}s")
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.01)
    ema_u = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_t = {k: v.detach().clone() for k, v in te.state_dict().items()}
    losses: list[float] = []
    run = 0.0
    t_start = time.time()

    def write(tag: str = "") -> None:
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        u2, t2 = build_unet(cfg), build_text_encoder(cfg, tok)
        u2.load_state_dict(ema_u)
        t2.load_state_dict(ema_t)
        save_module(u2, out_dir / f"base_unet{tag}.safetensors")
        save_module(t2, out_dir / f"base_text_encoder{tag}.safetensors")

    # ``stop_at`` ends early on the same schedule: the weights equal the run's checkpoint at that step.
    n_steps = min(stop_at or tc.steps, tc.steps)
    for step in range(n_steps):
        for g in opt.param_groups:
            g["lr"] = tc.lr * _lr_at(step, tc.steps, tc.warmup)
        idx = torch.randint(0, tc.n_images, (tc.batch,), generator=gen)
        x0 = x_all[idx]
        flip = torch.rand(tc.batch, generator=gen) < 0.5
        if flip.any():  # horizontal flip in pixel space == flip of the unshuffled latent's pixels
            px = torch.nn.functional.pixel_shuffle(x0[flip], cfg.patch).flip(-1)
            x0[flip] = torch.nn.functional.pixel_unshuffle(px, cfg.patch)
        ids = ids_all[idx].clone()
        drop = torch.rand(tc.batch, generator=gen) < tc.caption_dropout
        ids[drop] = empty
        loss = diffusion_loss(unet, te, sched, x0, ids, gen, tc.min_snr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(tc.ema, (1 + step) / (10 + step))
            for ema, mod in ((ema_u, unet), (ema_t, te)):
                for k, v in mod.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        lv = float(loss.detach())
        losses.append(lv)
        run = lv if step == 0 else 0.98 * run + 0.02 * lv
        if (step + 1) % log_every == 0 or step == 0:
            el = time.time() - t_start
            log(f"base step {step + 1}/{tc.steps} loss {run:.4f} ({el:.0f}s, {el / (step + 1):.2f}s/step)")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < n_steps:
            write("_ckpt")
    write()
    return {
        "losses": losses,
        "losses_first_last": [float(np.mean(losses[:50])), float(np.mean(losses[-50:]))],
        "train_seconds": round(time.time() - t_start, 1),
        "steps_done": n_steps,
        "schedule_steps": tc.steps,
        "batch": tc.batch,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib_klora.tools.world.train", description=__doc__)
    ap.add_argument("--all", action="store_true", help="train everything (base, LoRAs, judges, encoder)")
    ap.add_argument("--base", action="store_true", help="train the base model")
    ap.add_argument(
        "--loras", nargs="*", default=None, metavar="NAME", help="train the LoRAs (all six, or those named)"
    )
    ap.add_argument("--judges", action="store_true", help="train the two judges")
    ap.add_argument("--encoder", action="store_true", help="train the contrastive image encoder")
    ap.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, reproducible)")
    ap.add_argument("--base-steps", type=int, default=DiffusionTrain.steps, help="base training steps")
    ap.add_argument(
        "--base-stop-at", type=int, default=None, help="stop the base run at this step (same schedule)"
    )
    ap.add_argument("--out", type=Path, default=WEIGHTS, help="weights folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python -m lib_klora.tools.world.train " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.all or args.base:
        cfg = WorldConfig()
        tc = DiffusionTrain(steps=args.base_steps)
        stats = train_base(cfg, tc, args.seed, args.out, stop_at=args.base_stop_at)
        stats.pop("losses")
        base = {
            "config": cfg.to_dict(),
            "train": tc.__dict__,
            "seed": args.seed,
            "command": cmd,
            "threads": args.threads,
            **stats,
            "files": {
                n: file_entry(args.out / n)
                for n in ("base_unet.safetensors", "base_text_encoder.safetensors")
            },
        }
        update_manifest(args.out, lambda m: m.__setitem__("base", base))
    if args.all or args.loras is not None:
        from lib_klora.tools.world.lora import DEFAULT_LORAS, LoraTrain, save_lora, spec_dict, train_lora
        from lib_klora.tools.world.model import load_world

        unet, te, _, _ = load_world(args.out)
        for i, spec in enumerate(DEFAULT_LORAS):
            if args.loras and spec.name not in args.loras:
                continue
            tc = LoraTrain(steps=spec.steps or LoraTrain.steps)
            sd, stats = train_lora(unet, te, spec, tc, args.seed + 1000 + i, log=log)
            path = save_lora(sd, spec, args.out)
            entry = {
                "spec": spec_dict(spec),
                "train": tc.__dict__,
                "seed": args.seed + 1000 + i,
                **stats,
                "command": cmd,
                "file": path.name,
                **file_entry(path),
            }

            def put(m: dict, n: str = spec.name, e: dict = entry) -> None:
                m.setdefault("loras", {})[n] = e

            update_manifest(args.out, put)
            log(f"lora {spec.name}: {stats}")
    if args.all or args.judges:
        from lib_klora.tools.world.judges import train_judges

        stats = train_judges(args.out, args.seed, log=log)
        stats["command"] = cmd
        stats["files"] = {
            n: file_entry(args.out / n) for n in ("judge_object.safetensors", "judge_style.safetensors")
        }
        update_manifest(args.out, lambda m: m.__setitem__("judges", stats))
    if args.all or args.encoder:
        from lib_klora.tools.world.encoder import train_encoder

        stats = train_encoder(args.out, args.seed + 7, log=log)
        stats["command"] = cmd
        stats["files"] = {"image_encoder.safetensors": file_entry(args.out / "image_encoder.safetensors")}
        update_manifest(args.out, lambda m: m.__setitem__("encoder", stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
