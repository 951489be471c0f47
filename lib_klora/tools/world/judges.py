"""Two small CNN judges trained only on ground-truth renders: one names the object, one names the style.

Each judge has a ``reject`` class trained on noise, blanks, heavy-noise renders and blends of two renders,
so a broken image scores nothing. Positives are lightly degraded (blur, noise) so that the judges read
imperfect generated images, but the judges never see a generated image in training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ImageFilter
from torch import nn

from lib_klora.tools.world import render as R

REJECT = "reject"
OBJECT_CLASSES = (*R.OBJECTS, REJECT)
STYLE_CLASSES = (*R.STYLES, REJECT)


class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks at 32, 16, 8 and 4 pixels, global pool, linear head."""

    def __init__(self, n_out: int, width: int = 24) -> None:
        super().__init__()
        w = width

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images) -> torch.Tensor:
    """(N, 32, 32, 3) in [0, 1] (numpy or torch) → (N, 3, 32, 32) in [-1, 1]."""
    t = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, dtype=torch.float32)
    return t.permute(0, 3, 1, 2) * 2 - 1


# --- data --------------------------------------------------------------------------------------------------


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Degradations a small model's image may show: blur, washed-out colour, a colour cast, noise."""
    if rng.random() < 0.6:
        pil = R.to_pil(img).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
        img = np.asarray(pil, dtype=np.float32) / 255.0
    if rng.random() < 0.4:  # washed out towards a random grey
        t = np.float32(rng.uniform(0.0, 0.25))
        img = (1 - t) * img + t * np.float32(rng.uniform(0.4, 0.8))
    if rng.random() < 0.4:  # colour cast
        img = img + rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    if rng.random() < 0.6:
        img = img + rng.normal(0, rng.uniform(0.01, 0.08), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _reject_image(rng: np.random.Generator) -> np.ndarray:
    kind = int(rng.integers(5))
    shape = (R.SIZE, R.SIZE, 3)
    if kind == 0:  # uniform noise
        return rng.random(shape, dtype=np.float32)
    if kind == 1:  # gaussian noise around a colour
        return np.clip(rng.random(3) + rng.normal(0, 0.3, shape), 0, 1).astype(np.float32)
    if kind == 2:  # blank (one colour, maybe a soft gradient)
        c = rng.random(3).astype(np.float32)
        g = np.linspace(0, rng.uniform(-0.2, 0.2), R.SIZE, dtype=np.float32)[:, None, None]
        return np.clip(np.broadcast_to(c, shape) + g, 0, 1).astype(np.float32)
    if kind == 3:  # heavy-noise render
        o, s = R.OBJECTS[int(rng.integers(len(R.OBJECTS)))], R.STYLES[int(rng.integers(len(R.STYLES)))]
        img = R.render(o, s, rng)
        return np.clip(img + rng.normal(0, rng.uniform(0.3, 0.6), shape), 0, 1).astype(np.float32)
    # blend of two different renders (different object and different style)
    o1, o2 = rng.choice(len(R.OBJECTS), 2, replace=False)
    s1, s2 = rng.choice(len(R.STYLES), 2, replace=False)
    a = R.render(R.OBJECTS[o1], R.STYLES[s1], rng)
    b = R.render(R.OBJECTS[o2], R.STYLES[s2], rng)
    t = np.float32(rng.uniform(0.35, 0.65))
    return (t * a + (1 - t) * b).astype(np.float32)


@dataclass
class JudgeData:
    images: np.ndarray
    obj: np.ndarray  # index into OBJECT_CLASSES
    sty: np.ndarray  # index into STYLE_CLASSES


def judge_data(n: int, seed: int, reject_share: float = 0.15, degrade: bool = True) -> JudgeData:
    """Renders of every (object, style) combination, unseen ones included, plus reject images."""
    rng = np.random.default_rng(seed)
    imgs, objs, stys = [], [], []
    pairs = [(o, s) for o in R.OBJECTS for s in R.STYLES]
    for i in range(n):
        if rng.random() < reject_share:
            imgs.append(_reject_image(rng))
            objs.append(len(R.OBJECTS))
            stys.append(len(R.STYLES))
            continue
        o, s = pairs[i % len(pairs)]
        img = R.render(o, s, rng)
        imgs.append(_degrade(img, rng) if degrade else img)
        objs.append(R.OBJECTS.index(o))
        stys.append(R.STYLES.index(s))
    return JudgeData(np.stack(imgs), np.array(objs), np.array(stys))


# --- training and use --------------------------------------------------------------------------------------


@dataclass
class JudgeTrain:
    n_train: int = 16000
    n_test: int = 3000
    epochs: int = 5
    batch: int = 128
    lr: float = 3e-3
    width: int = 16


def train_judge(which: str, data: JudgeData, tc: JudgeTrain, seed: int, log=None) -> SmallCNN:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(data.obj if which == "object" else data.sty)
    n_out = len(OBJECT_CLASSES if which == "object" else STYLE_CLASSES)
    net = SmallCNN(n_out, tc.width)
    x = to_input(data.images)
    steps = tc.epochs * (len(x) // tc.batch)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc.lr, total_steps=steps)
    net.train()
    step = 0
    for ep in range(tc.epochs):
        perm = torch.randperm(len(x), generator=gen)
        tot = 0.0
        for b in range(len(x) // tc.batch):
            idx = perm[b * tc.batch : (b + 1) * tc.batch]
            xb = x[idx]
            if torch.rand((), generator=gen) < 0.5:
                xb = xb.flip(-1)
            loss = nn.functional.cross_entropy(net(xb), labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            tot += float(loss.detach())
        if log:
            log(f"judge {which} epoch {ep + 1}/{tc.epochs} loss {tot / (len(x) // tc.batch):.4f}")
    return net.eval()


@torch.no_grad()
def predict(net: SmallCNN, images, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(class index, probability) per image."""
    x = to_input(images)
    outs = [torch.softmax(net(x[i : i + batch]), -1) for i in range(0, len(x), batch)]
    p = torch.cat(outs)
    conf, idx = p.max(-1)
    return idx.numpy(), conf.numpy()


def accuracy(net: SmallCNN, which: str, data: JudgeData) -> dict:
    idx, _ = predict(net, data.images)
    lab = data.obj if which == "object" else data.sty
    reject = len(OBJECT_CLASSES if which == "object" else STYLE_CLASSES) - 1
    pos = lab != reject
    return {
        "renders": float((idx[pos] == lab[pos]).mean()),
        "reject": float((idx[~pos] == reject).mean()) if (~pos).any() else float("nan"),
        "all": float((idx == lab).mean()),
    }


class Judges:
    """The two judges, loaded from the shipped weights."""

    def __init__(self, object_net: SmallCNN, style_net: SmallCNN) -> None:
        self.object_net, self.style_net = object_net.eval(), style_net.eval()

    @classmethod
    def load(cls, weights_dir: Path | None = None, width: int = JudgeTrain.width) -> Judges:
        from safetensors.torch import load_file

        d = Path(weights_dir) if weights_dir else Path(__file__).parent / "weights"
        nets = []
        for which, classes in (("object", OBJECT_CLASSES), ("style", STYLE_CLASSES)):
            net = SmallCNN(len(classes), width)
            sd = load_file(str(d / f"judge_{which}.safetensors"))
            own = net.state_dict()
            net.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
            nets.append(net)
        return cls(*nets)

    def __call__(self, images) -> tuple[list[str], list[str]]:
        """Object and style names per image (``reject`` when the judge sees neither)."""
        oi, _ = predict(self.object_net, images)
        si, _ = predict(self.style_net, images)
        return [OBJECT_CLASSES[i] for i in oi], [STYLE_CLASSES[i] for i in si]


def save_judge(net: SmallCNN, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(path))


def train_judges(out_dir: Path | None, seed: int, tc: JudgeTrain | None = None, log=None) -> dict:
    """Train both judges, measure held-out accuracy on fresh renders, optionally save them; returns stats."""
    tc = tc or JudgeTrain()
    t0 = time.time()
    train = judge_data(tc.n_train, seed + 11)
    test = judge_data(tc.n_test, seed + 12, degrade=False)
    test_degraded = judge_data(tc.n_test, seed + 13)
    if log:
        log(f"judge data rendered in {time.time() - t0:.0f}s")
    stats: dict = {"train": tc.__dict__, "seed": seed}
    for which in ("object", "style"):
        t1 = time.time()
        net = train_judge(which, train, tc, seed + (1 if which == "object" else 2), log)
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_judge(net, out_dir / f"judge_{which}.safetensors")
        net = net.half().float().eval()  # measured as shipped (fp16)
        acc = accuracy(net, which, test)
        acc_d = accuracy(net, which, test_degraded)
        stats[which] = {
            "heldout_renders": acc["renders"],
            "heldout_reject": acc["reject"],
            "heldout_degraded_renders": acc_d["renders"],
            "train_seconds": round(time.time() - t1, 1),
        }
        if log:
            log(f"judge {which}: held-out {acc} degraded {acc_d}")
    stats["seconds"] = round(time.time() - t0, 1)
    return stats
