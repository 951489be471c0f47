"""Latent guidance: TAESD decoder, CLIP/DINO encoders, the objective and the x̂0 update.

Real architectures with random weights (no downloads); small latents keep it fast on a CPU.
"""

from __future__ import annotations

import base64
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")
pytest.importorskip("timm")

from safetensors.torch import save_file

from lib_klora.errors import KLoraError
from lib_klora.guidance.encoders import (
    ClipImageEncoder,
    DinoEncoder,
    ModelUnavailableError,
    preprocess,
)
from lib_klora.guidance.refine import (
    GuidanceConfig,
    GuidanceEncoders,
    GuidanceError,
    ReferenceSet,
    guide_x0,
    guided_steps,
    objective,
    should_guide,
    sigma_scale,
)
from lib_klora.guidance.taesd import (
    TaesdDecoder,
    TaesdError,
    decoder_from_state_dict,
    load_taesd_decoder,
)
from lib_klora.params.references import ReferenceImageError, decode_reference_image

LATENT = 16  # 16×16 latent → 128 px image, upsampled to 224 by the encoders' preprocessing


def _random_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth random colours, not white noise: closer to what the encoders see in practice.
    small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module")
def decoder() -> TaesdDecoder:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sd = TaesdDecoder().state_dict()
    # Random init puts almost every pixel near 0, where the [0, 1] clamp would cut most gradients; centre the
    # output like a trained decoder's so the tests exercise real gradients.
    sd["19.weight"] = sd["19.weight"] * 8
    sd["19.bias"] = torch.full_like(sd["19.bias"], 0.5)
    return decoder_from_state_dict(sd)


@pytest.fixture(scope="module")
def encoders() -> GuidanceEncoders:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GuidanceEncoders(clip=ClipImageEncoder(pretrained=None), dino=DinoEncoder(pretrained=False))


@pytest.fixture(scope="module")
def refs(encoders: GuidanceEncoders) -> ReferenceSet:
    return ReferenceSet.build(
        encoders,
        style_images=[_random_image(1)],
        subject_images=[_random_image(2), _random_image(3, (64, 64))],
        prompt="a photo of a dog",
        cfg=GuidanceConfig(subject_clip=0.5, text_clip=0.5),
    )


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Every connection attempt fails like a machine without network; hub caches point at an empty folder."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"), raising=False)
    old_hub_dir = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield
    torch.hub.set_dir(old_hub_dir)


# --- TAESD ----------------------------------------------------------------------------------------------


def test_taesd_shape_range_and_layout(decoder: TaesdDecoder) -> None:
    assert sum(p.numel() for p in decoder.parameters()) == 1_222_531  # the published decoder's size
    assert {"1.weight", "3.conv.0.weight", "7.weight", "18.conv.4.bias", "19.weight"} <= set(
        decoder.state_dict()
    )
    z = torch.randn(2, 4, 8, 12) * 3
    img = decoder.decode(z)
    assert img.shape == (2, 3, 64, 96) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert not any(p.requires_grad for p in decoder.parameters())


def test_taesd_safetensors_round_trip_and_other_layouts(decoder: TaesdDecoder, tmp_path: Path) -> None:
    path = tmp_path / "taesd_decoder.safetensors"
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path))
    loaded = load_taesd_decoder(path)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(z), decoder(z))
        # The host's own model, wrapped ("decoder.N") and diffusers' AutoencoderTiny ("decoder.layers.N-1").
        wrapped = load_taesd_decoder(state_dict={f"decoder.{k}": v for k, v in decoder.state_dict().items()})
        assert torch.equal(wrapped(z), decoder(z))
        diffusers = {
            f"decoder.layers.{int(k.split('.', 1)[0]) - 1}.{k.split('.', 1)[1]}": v
            for k, v in decoder.state_dict().items()
        }
        assert torch.equal(load_taesd_decoder(state_dict=diffusers)(z), decoder(z))
    # 16-channel variants (SD3/FLUX decoders) are recognised from the weights.
    assert decoder_from_state_dict(TaesdDecoder(latent_channels=16).state_dict()).latent_channels == 16


def test_taesd_refuses_pickles_and_bad_files(tmp_path: Path) -> None:
    pth = tmp_path / "taesd_decoder.pth"
    pth.write_bytes(b"not even opened")
    with pytest.raises(TaesdError, match=r"pickle.*taesd_decoder\.safetensors.*state_dict="):
        load_taesd_decoder(pth)
    with pytest.raises(TaesdError, match=r"file not found.*madebyollin/taesd"):
        load_taesd_decoder(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(TaesdError, match="cannot read as safetensors"):
        load_taesd_decoder(junk)
    with pytest.raises(TaesdError, match="not a TAESD decoder"):
        load_taesd_decoder(state_dict={"1.weight": torch.zeros(8, 4, 3, 3)})


# --- encoders -------------------------------------------------------------------------------------------


def test_embeddings_are_normalised_and_differentiable(encoders: GuidanceEncoders) -> None:
    images = torch.rand(2, 3, 160, 128, requires_grad=True)
    for enc, dim in ((encoders.clip, 512), (encoders.dino, 384)):
        emb = enc.embed(images)
        assert emb.shape == (2, dim) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
        (grad,) = torch.autograd.grad(emb[:, 0].sum(), images)
        assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    text = encoders.clip.embed_text(["a dog", "a painting"])
    assert text.shape == (2, 512)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert encoders.clip.size == 224 and encoders.dino.size == 224


def test_preprocess_resizes_crops_and_normalises() -> None:
    x = torch.full((1, 3, 600, 400), 0.5)
    for exact in (False, True):
        out = preprocess(x, 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), exact=exact)
        assert out.shape == (1, 3, 224, 224)
        torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-5, rtol=0)
    with pytest.raises(KLoraError, match="B, 3, H, W"):
        preprocess(torch.rand(3, 8, 8), 224, (0, 0, 0), (1, 1, 1))


def test_local_weight_files_are_used(tmp_path: Path) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        dino = DinoEncoder(pretrained=False)
        clip = ClipImageEncoder("ViT-S-32", None)  # the smallest real open_clip ViT: a quick round trip
    save_file(
        {k: v.contiguous() for k, v in dino.model.state_dict().items()},
        str(tmp_path / dino.local_filename(dino.name)),
    )
    save_file(
        {k: v.contiguous() for k, v in clip.model.state_dict().items()},
        str(tmp_path / ClipImageEncoder.local_filename("ViT-S-32", "mine")),
    )
    x = torch.rand(1, 3, 64, 64)
    dino2 = DinoEncoder(pretrained=True, weights_dir=tmp_path, download=False)
    clip2 = ClipImageEncoder("ViT-S-32", "mine", weights_dir=tmp_path, download=False)
    assert not dino2.random_weights and clip2.name == "ViT-S-32:mine"
    with torch.no_grad():
        torch.testing.assert_close(dino2.embed(x), dino.embed(x))
        torch.testing.assert_close(clip2.embed(x), clip.embed(x))


def test_offline_without_local_file_names_file_repo_and_folder(offline: None, tmp_path: Path) -> None:
    weights = tmp_path / "klora-weights"
    with pytest.raises(ModelUnavailableError) as clip_err:
        ClipImageEncoder("ViT-B-32", "laion2b_s34b_b79k", weights_dir=weights)
    msg = str(clip_err.value)
    assert "cannot be reached" in msg or "switched off" in msg  # the download into weights_dir was tried
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in msg and "open_clip_model.safetensors" in msg
    assert str(weights / "open_clip_ViT-B-32_laion2b_s34b_b79k.safetensors") in msg

    with pytest.raises(ModelUnavailableError) as dino_err:
        DinoEncoder("vit_small_patch16_224.dino", pretrained=True, weights_dir=weights)
    msg = str(dino_err.value)
    assert "timm/vit_small_patch16_224.dino" in msg and "model.safetensors" in msg
    assert str(weights / "timm_vit_small_patch16_224.dino.safetensors") in msg

    with pytest.raises(ModelUnavailableError, match="downloads are disabled"):
        DinoEncoder(pretrained=True, weights_dir=weights, download=False)
    assert not weights.exists() or not any(weights.iterdir())  # no partial files left behind


def test_download_lands_in_the_weights_folder_atomically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub

    from lib_klora.guidance import downloads

    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, cache_dir: str) -> str:
        calls.append((repo_id, filename))
        path = Path(cache_dir) / "blob"
        path.write_bytes(b"weights")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("lib_klora.guidance.downloads.hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(downloads, "_hub_offline", lambda: False)
    messages: list[str] = []
    target = tmp_path / "klora" / "timm_x.safetensors"
    assert downloads.download_file("timm/x", "model.safetensors", target, progress=messages.append) == target
    assert target.read_bytes() == b"weights" and calls == [("timm/x", "model.safetensors")]
    assert sorted(p.name for p in target.parent.iterdir()) == ["timm_x.safetensors"]  # scratch removed
    assert "downloading timm/x/model.safetensors" in messages[0]

    def broken(**_kwargs: object) -> str:
        raise OSError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken)
    with pytest.raises(
        downloads.DownloadError, match=r"connection reset.*Download https://huggingface\.co/t/y"
    ):
        downloads.download_file("t/y", "model.safetensors", tmp_path / "klora" / "y.safetensors")
    assert not (tmp_path / "klora" / "y.safetensors").exists()


def test_unknown_models_and_tags_are_clear_errors() -> None:
    with pytest.raises(KLoraError, match="no pretrained weights 'nonsense'"):
        ClipImageEncoder("ViT-B-32", "nonsense", download=False)
    with pytest.raises(KLoraError, match="unknown open_clip model"):
        ClipImageEncoder("No-Such-Model", None)
    with pytest.raises(KLoraError, match="unknown timm model"):
        DinoEncoder("no_such_model_xyz", pretrained=False)


# --- configuration and schedule -------------------------------------------------------------------------


def test_should_guide_window_and_every() -> None:
    cfg = GuidanceConfig(start=0.2, end=0.8, every=3)
    assert guided_steps(10, cfg) == [2, 5]
    assert [i for i in range(20) if should_guide(i, 20, GuidanceConfig())] == list(range(18))  # r < 0.9
    assert guided_steps(10, GuidanceConfig(start=0.0, end=1.0, every=4)) == [0, 4, 8]
    assert guided_steps(10, GuidanceConfig(start=0.5, end=0.5)) == []
    assert guided_steps(10, GuidanceConfig(eta=0.0)) == []  # inactive
    assert guided_steps(10, GuidanceConfig(style_clip=0, subject_dino=0)) == []
    assert not should_guide(10, 10, GuidanceConfig()) and not should_guide(-1, 10, GuidanceConfig())
    assert guided_steps(3, GuidanceConfig(start=1 / 3, end=1.0)) == [1, 2]  # float noise at the boundary


def test_validate(refs: ReferenceSet) -> None:
    assert GuidanceConfig().validate(refs).active
    with pytest.raises(GuidanceError, match="no reference images"):
        GuidanceConfig().validate(ReferenceSet())
    with pytest.raises(GuidanceError, match="no reference images"):
        GuidanceConfig().validate(None)
    GuidanceConfig(eta=0.0).validate(None)  # off: nothing needed
    GuidanceConfig().validate(None, check_refs=False)
    with pytest.raises(GuidanceError) as err:
        GuidanceConfig(style_clip=-1, eta=float("nan"), start=0.5, end=0.2, every=0, iters=0).validate(refs)
    for part in ("style_clip weight", "eta must be a finite", "start", "every", "iters"):
        assert part in str(err.value)
    only_style = ReferenceSet(style_clip=refs.style_clip)
    assert GuidanceConfig().missing_references(only_style) == ["subject_dino"]
    assert GuidanceConfig().effective_weights(only_style) == {"style_clip": 1.0}


def test_sigma_scale() -> None:
    x = torch.zeros(2, 4, 1, 1)
    torch.testing.assert_close(sigma_scale(0.0, 2, x).flatten(), torch.zeros(2))
    torch.testing.assert_close(
        sigma_scale(torch.tensor([1.0, 1e6]), 2, x).flatten(), torch.tensor([2**-0.5, 1.0])
    )
    with pytest.raises(GuidanceError):
        sigma_scale(torch.tensor([1.0, 2.0, 3.0]), 2, x)


# --- the update -----------------------------------------------------------------------------------------


def test_guidance_step_increases_objective(
    decoder: TaesdDecoder, encoders: GuidanceEncoders, refs: ReferenceSet
) -> None:
    cfg = GuidanceConfig(subject_clip=0.5, text_clip=0.5, eta=0.02)
    x0 = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    before = x0.clone()
    with torch.no_grad():
        start = float(objective(x0, decoder.decode, encoders, refs, cfg))
        moved = guide_x0(x0, 2.0, decoder, encoders, refs, cfg)
        end = float(objective(moved, decoder.decode, encoders, refs, cfg))
    assert torch.equal(x0, before)  # input untouched
    assert moved.shape == x0.shape and moved.dtype == x0.dtype
    assert end > start
    # Per-sample step size: RMS = η·σ/√(σ²+1).
    rms = (moved - x0).pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.full((2,), 0.02 * 2 / 5**0.5), rtol=1e-4, atol=0)
    # First-order ascent: half the step gives about half the gain.
    with torch.no_grad():
        half = guide_x0(
            x0, 2.0, decoder, encoders, refs, GuidanceConfig(subject_clip=0.5, text_clip=0.5, eta=0.01)
        )
        half_gain = float(objective(half, decoder.decode, encoders, refs, cfg)) - start
    assert 0.35 < half_gain / (end - start) < 0.65


def test_guidance_noops(decoder: TaesdDecoder, encoders: GuidanceEncoders, refs: ReferenceSet) -> None:
    x0 = torch.randn(1, 4, LATENT, LATENT)
    assert guide_x0(x0, 1.0, decoder, encoders, refs, GuidanceConfig(style_clip=0, subject_dino=0)) is x0
    assert guide_x0(x0, 1.0, decoder, encoders, refs, GuidanceConfig(eta=0)) is x0
    assert guide_x0(x0, 1.0, decoder, encoders, ReferenceSet(), GuidanceConfig()) is x0
    assert guide_x0(x0, 1.0, decoder, encoders, None, GuidanceConfig()) is x0
    # σ = 0 (the last step of many schedules): the step vanishes.
    torch.testing.assert_close(guide_x0(x0, 0.0, decoder, encoders, refs, GuidanceConfig()), x0)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_guidance_inside_sampler_contexts(
    mode: str, decoder: TaesdDecoder, encoders: GuidanceEncoders, refs: ReferenceSet
) -> None:
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    cfg = GuidanceConfig(style_clip=1.0, subject_dino=0.0, iters=2)
    with context():
        x0 = torch.randn(1, 4, LATENT, LATENT, dtype=torch.float16)
        # References embedded inside the sampler's mode are usable too.
        late_refs = ReferenceSet(style_clip=encoders.clip.embed(torch.rand(1, 3, 64, 64)))
        out = guide_x0(x0, torch.tensor([3.0]), decoder, encoders, late_refs, cfg)
        assert out.dtype == torch.float16 and not out.requires_grad
        assert out.is_inference() == (mode == "inference_mode")
        assert not torch.equal(out, x0)
        assert torch.is_grad_enabled() is False  # the caller's mode is restored


def test_models_built_inside_inference_mode(encoders: GuidanceEncoders, refs: ReferenceSet) -> None:
    # The loaders step out of inference mode themselves, so hosts may build models anywhere.
    with torch.inference_mode():
        dec = decoder_from_state_dict(TaesdDecoder().state_dict())
        assert not dec[1].weight.is_inference()
        x0 = torch.randn(1, 4, 8, 8)
        out = guide_x0(x0, 1.0, dec, encoders, refs, GuidanceConfig(subject_dino=0.0))
    assert out.shape == x0.shape
    # A model the host built in inference mode by other means is reported clearly.
    with torch.inference_mode():
        bad = TaesdDecoder()
    with pytest.raises(GuidanceError, match="inference_mode"):
        guide_x0(x0, 1.0, bad, encoders, refs, GuidanceConfig())


def test_reference_set_needs_the_encoder() -> None:
    with pytest.raises(GuidanceError, match="needs a DINO encoder"):
        ReferenceSet.build(
            GuidanceEncoders(), subject_images=[_random_image(0)], cfg=GuidanceConfig(style_clip=0)
        )


# --- reference uploads ----------------------------------------------------------------------------------


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _random_image(5).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_reference_image_accepts_bytes_base64_and_data_urls() -> None:
    raw = _png_bytes()
    b64 = base64.b64encode(raw).decode()
    for data in (raw, b64, f"data:image/png;base64,{b64}", b64.rstrip("=") + "\n"):
        im = decode_reference_image(data)
        assert im.mode == "RGB" and im.size == (96, 80)


def test_decode_reference_image_errors() -> None:
    with pytest.raises(ReferenceImageError, match="style ref: not valid base64"):
        decode_reference_image("this is *not* base64!", name="style ref")
    with pytest.raises(ReferenceImageError, match="not a readable image"):
        decode_reference_image(b"GIF89a but not really an image")
    with pytest.raises(ReferenceImageError, match="not a readable image"):
        decode_reference_image(base64.b64encode(b"plain text").decode())
    with pytest.raises(ReferenceImageError, match="not a readable image"):
        decode_reference_image(_png_bytes()[:60])  # truncated
    with pytest.raises(ReferenceImageError, match="empty"):
        decode_reference_image("")
    with pytest.raises(ReferenceImageError, match="data URL must be base64"):
        decode_reference_image("data:image/png,abcd")
    with pytest.raises(ReferenceImageError, match="expected image bytes"):
        decode_reference_image(123)  # type: ignore[arg-type]
    assert issubclass(ReferenceImageError, KLoraError)
