"""A small CLIP-style image encoder for the world: the CLIP/DINO stand-in for reference guidance.

An image tower (small CNN → unit embedding) trained contrastively against a caption tower (word embeddings
of the caption's object and style) on the world's renders, unseen subjects and styles included. It is
distinct from the judges (other architecture head, other objective, other data seed) and differentiable, so
guidance can take gradients through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lib_klora.tools.world import render as R
from lib_klora.tools.world.judges import SmallCNN, _degrade

EMBED_DIM = 64


class WorldImageEncoder(nn.Module):
    def __init__(self, width: int = 16, dim: int = EMBED_DIM) -> None:
        super().__init__()
        self.tower = SmallCNN(dim, width)
        self.objects = nn.Embedding(len(R.OBJECTS), dim)
        self.styles = nn.Embedding(len(R.STYLES), dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.6))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 32, 32, 3) in [0, 1] → unit embeddings (N, dim); differentiable."""
        x = images.permute(0, 3, 1, 2) * 2 - 1
        return nn.functional.normalize(self.tower(x), dim=-1)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        pairs = [R.parse_caption(c) for c in captions]
        o = torch.tensor([R.OBJECTS.index(p[0]) for p in pairs])
        s = torch.tensor([R.STYLES.index(p[1]) for p in pairs])
        return nn.functional.normalize(self.objects(o) + self.styles(s), dim=-1)


@dataclass
class EncoderTrain:
    n_train: int = 8000
    epochs: int = 5
    batch: int = 128
    lr: float = 3e-3
    width: int = 16


def train_encoder(out_dir: Path | None, seed: int, tc: EncoderTrain | None = None, log=None) -> dict:
    tc = tc or EncoderTrain()
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed + 21)
    pairs = [(o, s) for o in R.OBJECTS for s in R.STYLES]
    imgs, po, ps = [], [], []
    for i in range(tc.n_train):
        o, s = pairs[i % len(pairs)]
        imgs.append(_degrade(R.render(o, s, rng), rng))
        po.append(R.OBJECTS.index(o))
        ps.append(R.STYLES.index(s))
    x = torch.as_tensor(np.stack(imgs))
    po_t, ps_t = torch.tensor(po), torch.tensor(ps)
    enc = WorldImageEncoder(tc.width)
    opt = torch.optim.AdamW(enc.parameters(), lr=tc.lr, weight_decay=1e-4)
    per_epoch = len(x) // tc.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=tc.epochs * per_epoch)
    enc.train()
    for ep in range(tc.epochs):
        perm = torch.randperm(len(x), generator=gen)
        tot = 0.0
        for b in range(per_epoch):
            idx = perm[b * tc.batch : (b + 1) * tc.batch]
            zi = enc.encode_images(x[idx])
            zt = nn.functional.normalize(enc.objects(po_t[idx]) + enc.styles(ps_t[idx]), dim=-1)
            logits = enc.logit_scale.exp().clamp(max=100) * zi @ zt.T
            same = (po_t[idx][:, None] == po_t[idx][None]) & (ps_t[idx][:, None] == ps_t[idx][None])
            target = same.float() / same.float().sum(-1, keepdim=True)  # duplicates are positives too
            loss = 0.5 * (
                -(target * logits.log_softmax(-1)).sum(-1).mean()
                - (target * logits.T.log_softmax(-1)).sum(-1).mean()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
        if log:
            log(f"encoder epoch {ep + 1}/{tc.epochs} loss {tot / per_epoch:.4f}")
    enc.eval()
    # retrieval accuracy on fresh renders: nearest caption among all 81
    test = R.render_set([(o, s) for o in R.OBJECTS for s in R.STYLES], 810, seed + 22)
    caps = [R.caption(o, s) for o in R.OBJECTS for s in R.STYLES]
    enc16 = enc.half().float().eval()
    with torch.no_grad():
        zi = enc16.encode_images(torch.as_tensor(test.images))
        zt = enc16.encode_captions(caps)
        pred = (zi @ zt.T).argmax(-1).numpy()
    truth = np.array([caps.index(c) for c in test.captions])
    acc = float((pred == truth).mean())
    if log:
        log(f"encoder caption retrieval on fresh renders: {acc:.3f}")
    if out_dir is not None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in enc.state_dict().items()}
        save_file(sd, str(out_dir / "image_encoder.safetensors"))
    return {"train": tc.__dict__, "seed": seed, "retrieval_81way": acc, "seconds": round(time.time() - t0, 1)}


def load_encoder(weights_dir: Path | None = None, width: int = EncoderTrain.width) -> WorldImageEncoder:
    from safetensors.torch import load_file

    d = Path(weights_dir) if weights_dir else Path(__file__).parent / "weights"
    enc = WorldImageEncoder(width)
    sd = load_file(str(d / "image_encoder.safetensors"))
    own = enc.state_dict()
    enc.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
    return enc.eval()
