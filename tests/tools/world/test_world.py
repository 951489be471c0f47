"""The toy world: renders, model, sampler, training, LoRA files, judges and shipped weights (fast configs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from lib_klora.tools.world import render as R  # noqa: E402

WEIGHTS = Path(R.__file__).parent / "weights"
needs_weights = pytest.mark.skipif(
    not (WEIGHTS / "manifest.json").exists(), reason="world weights not present"
)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: one thread avoids OpenMP stalls under load
    yield
    torch.set_num_threads(old)


def test_render_is_deterministic_and_covers_every_pair():
    for o in R.OBJECTS:
        for s in R.STYLES:
            a, b = R.render(o, s, 7), R.render(o, s, 7)
            assert a.shape == (R.SIZE, R.SIZE, 3) and a.dtype == np.float32
            assert np.array_equal(a, b)
            assert a.min() >= 0.0 and a.max() <= 1.0
    assert not np.array_equal(R.render("star", "dots", 1), R.render("star", "dots", 2))


def test_render_set_captions_match_labels():
    batch = R.render_set(None, 40, seed=3)
    assert len(batch.captions) == 40
    for cap, o, s in zip(batch.captions, batch.objects, batch.styles, strict=True):
        assert R.parse_caption(cap) == (o, s)
        assert o in R.GENERIC_OBJECTS and s in R.GENERIC_STYLES
    again = R.render_set(None, 40, seed=3)
    assert np.array_equal(batch.images, again.images) and batch.captions == again.captions
    assert R.caption("sks", "plk") == "a sks in plk style"
    with pytest.raises(ValueError):
        R.parse_caption("a sks in plk")


def test_tokenizer_is_offline_and_fixed_length():
    from lib_klora.tools.world.model import MAX_LEN, WorldTokenizer

    tok = WorldTokenizer()
    ids = tok(["a sks in plk style", "", "a whatever in dots style"])
    assert ids.shape == (3, MAX_LEN)
    assert ids[0, 0] == tok.bos_token_id and ids[0, 6] == tok.eos_token_id
    assert ids[1, 1] == tok.eos_token_id
    assert ids[2, 2] == tok.unk_token_id
    assert len({int(i) for i in ids[0]}) == MAX_LEN  # every word its own token


def _tiny_models():
    from lib_klora.tools.world.model import WorldTokenizer, build_text_encoder, build_unet, tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    return build_unet(cfg).eval(), build_text_encoder(cfg, WorldTokenizer()).eval(), cfg


def test_unet_is_sd_shaped():
    unet, _, _ = _tiny_models()
    names = [n for n, _ in unet.named_modules()]
    for part in ("attn1.to_q", "attn2.to_k", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
        assert any(n.endswith(part) for n in names), part
    assert any("resnets" in n for n in names)


def test_sampler_clock_and_batched_cfg():
    from lib_klora.tools.world.model import sample

    unet, te, _ = _tiny_models()
    events: list = []
    handle = unet.register_forward_pre_hook(lambda m, args: events.append(("unet", args[0].shape[0])))
    try:
        out = sample(
            unet,
            te,
            ["a star in dots style"] * 3,
            [1, 2, 3],
            steps=6,
            cfg=3.0,
            step_callback=lambda i, n: events.append(("step", i, n)),
        )
    finally:
        handle.remove()
    assert out.shape == (3, R.SIZE, R.SIZE, 3)
    steps = [e for e in events if e[0] == "step"]
    assert steps == [("step", i, 6) for i in range(6)]
    # each step: its callback, then exactly one UNet call with uncond + cond batched
    assert events == [x for i in range(6) for x in (("step", i, 6), ("unet", 6))]


def test_sampling_is_deterministic_per_seed():
    from lib_klora.tools.world.model import sample

    unet, te, _ = _tiny_models()
    a = sample(unet, te, ["a star in dots style", "a sks in plk style"], [5, 6], steps=4)
    b = sample(unet, te, ["a star in dots style", "a sks in plk style"], [5, 6], steps=4)
    assert torch.equal(a, b)
    alone = sample(unet, te, ["a sks in plk style"], [6], steps=4)
    assert torch.allclose(alone[0], a[1], atol=1e-4)  # an image does not depend on its batch


def test_tiny_training_run_loss_is_finite_and_falls():
    from lib_klora.tools.world.model import tiny_config
    from lib_klora.tools.world.train import DiffusionTrain, train_base

    tc = DiffusionTrain(steps=40, batch=16, n_images=64, warmup=5, lr=2e-3)
    stats = train_base(tiny_config(), tc, seed=0, out_dir=None, log_every=1000, checkpoint_every=0)
    losses = np.array(stats["losses"])
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.8 * losses[:5].mean()


def test_lora_files_kohya_and_diffusers_merge_like_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    from lib_klora.tools.world.lora import (
        TARGET_MODULES,
        LoraSpec,
        LoraTrain,
        merged_unet,
        save_lora,
        train_lora,
    )

    unet, te, cfg = _tiny_models()
    x = torch.randn(2, 12, 16, 16)
    h = torch.randn(2, 8, cfg.text_hidden)
    for fmt, key in (("kohya", "lora_unet_"), ("diffusers", "unet.")):
        spec = LoraSpec(f"t_{fmt}", "subject", "sks", rank=4, alpha=2.0 if fmt == "kohya" else 4.0, fmt=fmt)
        sd, _ = train_lora(unet, te, spec, LoraTrain(steps=3, batch=4, n_images=6), seed=0)
        path = save_lora(sd, spec, tmp_path)
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            assert all(k.startswith(key) for k in keys)
            assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
        # the file's weights are zero-up at init: nudge them so the comparison means something
        sd = {k: (v + 0.05 if "lora_B" in k else v) for k, v in sd.items()}
        path = save_lora(sd, spec, tmp_path)
        ref = __import__("copy").deepcopy(unet)
        ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=spec.alpha, target_modules=TARGET_MODULES))
        set_peft_model_state_dict(ref, {k: v.half().float() for k, v in sd.items()})
        with torch.no_grad():
            want = ref(x, 500, encoder_hidden_states=h).sample
            got = merged_unet(unet, path)(x, 500, encoder_hidden_states=h).sample
            base = unet(x, 500, encoder_hidden_states=h).sample
        assert (want - base).abs().max() > 1e-3
        assert torch.allclose(want, got, atol=1e-4)


@needs_weights
def test_shipped_files_sizes_and_hashes():
    from lib_klora.tools.world.train import sha256

    manifest = json.loads((WEIGHTS / "manifest.json").read_text())
    files = sorted(WEIGHTS.glob("*.safetensors"))
    assert files
    for f in files:
        assert f.stat().st_size <= 4 * 1024 * 1024, f.name
    assert sum(f.stat().st_size for f in files) <= 16 * 1024 * 1024
    entries = dict(manifest["base"]["files"])
    entries.update(manifest["judges"]["files"])
    for lora in manifest.get("loras", {}).values():
        entries[lora["file"]] = lora
    for name, entry in entries.items():
        assert sha256(WEIGHTS / name) == entry["sha256"], name


@needs_weights
def test_judges_heldout_accuracy_on_renders():
    from lib_klora.tools.world.judges import REJECT, Judges, judge_data

    judges = Judges.load()
    data = judge_data(405, seed=4242, reject_share=0.0, degrade=False)  # 5 per (object, style) pair
    objs, stys = judges(data.images)
    obj_acc = np.mean([o == R.OBJECTS[i] for o, i in zip(objs, data.obj, strict=True)])
    sty_acc = np.mean([s == R.STYLES[i] for s, i in zip(stys, data.sty, strict=True)])
    assert obj_acc >= 0.95 and sty_acc >= 0.95, (obj_acc, sty_acc)
    rng = np.random.default_rng(1)
    noise = rng.random((20, R.SIZE, R.SIZE, 3), dtype=np.float32)
    blank = np.broadcast_to(rng.random((20, 1, 1, 3), dtype=np.float32), noise.shape).copy()
    o, s = judges(np.concatenate([noise, blank]))
    assert np.mean([x == REJECT for x in o]) >= 0.9 and np.mean([x == REJECT for x in s]) >= 0.9


@needs_weights
def test_shipped_world_loads_and_samples():
    from lib_klora.tools.world.model import load_world, sample

    unet, te, tok, _ = load_world()
    img = sample(unet, te, ["a circle in flat style"], [0], steps=4, tokenizer=tok)
    assert img.shape == (1, R.SIZE, R.SIZE, 3) and torch.isfinite(img).all()
