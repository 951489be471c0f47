"""The world's base model: a tiny Stable-Diffusion-shaped text-to-image model.

A diffusers ``UNet2DConditionModel`` (ResBlocks + transformer blocks with attn1/attn2/ff, cross-attention
to the text) on 32×32 RGB seen through a lossless 2×2 space-to-depth (16×16×12 "latents", no VAE), a small
transformers ``CLIPTextModel`` fed by an offline word-level tokenizer over the world's vocabulary, a DDPM
schedule for training and an ancestral DDPM sampler (20–30 steps) with batched classifier-free guidance.

diffusers and transformers are imported here only (they are optional for the rest of lib_klora).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from lib_klora.tools.world.render import OBJECTS, SIZE, STYLES

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
WORDS = ("a", "in", "style", *OBJECTS, *STYLES)
MAX_LEN = 8  # <bos> a X in Y style <eos> <pad>


class WorldTokenizer:
    """Word-level tokenizer over the world's vocabulary (works offline; unknown words map to ``<unk>``)."""

    def __init__(self, words: Sequence[str] = WORDS, max_length: int = MAX_LEN) -> None:
        self.vocab = {w: i for i, w in enumerate((*SPECIAL, *words))}
        self.model_max_length = max_length
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = [self.vocab.get(w, self.unk_token_id) for w in text.lower().split()]
        ids = [self.bos_token_id, *ids[: self.model_max_length - 2], self.eos_token_id]
        return ids + [self.pad_token_id] * (self.model_max_length - len(ids))

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)


@dataclass
class WorldConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True)  # no attention at 16×16 (CPU cost)
    patch: int = 2  # lossless space-to-depth "VAE": 32×32×3 pixels <-> 16×16×12 latents
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 128
    train_timesteps: int = 1000
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["attention_levels"] = list(self.attention_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        d = dict(d)
        d["block_out_channels"] = tuple(d["block_out_channels"])
        d["attention_levels"] = tuple(d["attention_levels"])
        return cls(**d)


def tiny_config() -> WorldConfig:
    """A very small configuration for fast tests."""
    return WorldConfig(
        block_out_channels=(16, 32, 32),
        attention_levels=(False, True, False),
        attention_heads=2,
        norm_num_groups=8,
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_intermediate=64,
    )


def build_unet(cfg: WorldConfig):
    from diffusers import UNet2DConditionModel

    levels = cfg.attention_levels
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels))
    ch = 3 * cfg.patch * cfg.patch
    return UNet2DConditionModel(
        sample_size=SIZE // cfg.patch,
        in_channels=ch,
        out_channels=ch,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_heads,  # diffusers' historical name: the number of heads
        norm_num_groups=cfg.norm_num_groups,
    )


def build_text_encoder(cfg: WorldConfig, tokenizer: WorldTokenizer | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tokenizer or WorldTokenizer()
    tcfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        projection_dim=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=tok.model_max_length,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return CLIPTextModel(tcfg)


def train_scheduler(cfg: WorldConfig | None = None):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=(cfg or WorldConfig()).train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
    )


def sample_scheduler(cfg: WorldConfig | None = None):
    """DDPM ancestral sampling on 20–30 "trailing" steps, x0 clipped to the data range.

    Measured on the trained world: the stochastic sampler corrects the small model's errors, where DDIM (η=0)
    keeps residual noise; without x0 clipping the first step (α≈0 on the cosine schedule) blows up.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=(cfg or WorldConfig()).train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        timestep_spacing="trailing",
    )


def ddim_scheduler(cfg: WorldConfig | None = None):
    """Deterministic DDIM (η=0) alternative."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=(cfg or WorldConfig()).train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )


@torch.no_grad()
def encode_text(
    text_encoder, prompts: Sequence[str], tokenizer: WorldTokenizer | None = None
) -> torch.Tensor:
    tok = tokenizer or WorldTokenizer()
    ids = tok(list(prompts)).to(text_encoder.device)
    return text_encoder(input_ids=ids).last_hidden_state


def patch_of(unet) -> int:
    """The space-to-depth factor of a world UNet (its latent has 3·p² channels)."""
    return round((unet.config.in_channels / 3) ** 0.5)


def to_pixels(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """Latents [-1, 1] (N, 3p², H/p, W/p) → images (N, H, W, 3) in [0, 1]."""
    if patch > 1:
        x = torch.nn.functional.pixel_shuffle(x, patch)
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def to_model(images, patch: int = 2) -> torch.Tensor:
    """Images (N, H, W, 3) in [0, 1] (numpy or torch) → latents (N, 3p², H/p, W/p) in [-1, 1]."""
    t = torch.as_tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) * 2 - 1
    return torch.nn.functional.pixel_unshuffle(t, patch) if patch > 1 else t


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: initial noise and sampler noise come from the image's own seed."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def initial_noise(seeds_or_generators, patch: int = 2) -> torch.Tensor:
    """Per-image initial noise from its own seed (an image does not depend on its batch)."""
    shape = (3 * patch * patch, SIZE // patch, SIZE // patch)
    gens = [
        g if isinstance(g, torch.Generator) else torch.Generator().manual_seed(int(g))
        for g in seeds_or_generators
    ]
    return torch.stack([torch.randn(*shape, generator=g) for g in gens])


@torch.no_grad()
def sample(
    unet,
    text_encoder,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    cfg: float = 4.0,
    step_callback: Callable[[int, int], None] | None = None,
    guide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    tokenizer: WorldTokenizer | None = None,
    negative_prompt: str = "",
    scheduler=None,
    return_model_space: bool = False,
) -> torch.Tensor:
    """Sampling with classifier-free guidance, uncond and cond in one batched UNet call per step.

    ``step_callback(step_index, total_steps)`` runs once per sampler step, before that step's UNet call.
    ``guide(x0, sigma)`` may move the step's denoised estimate x̂0 (reference guidance); the step then
    continues from the moved x̂0 (σ = √((1−ᾱ)/ᾱ), the noise level in the k-diffusion sense).
    Each image's initial noise comes from its own seed, so an image does not depend on its batch.
    Returns images (N, 32, 32, 3) in [0, 1] (or the latent tensor when ``return_model_space``).
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    sched = scheduler or sample_scheduler()
    sched.set_timesteps(steps)
    n = len(prompts)
    cond = encode_text(text_encoder, prompts, tokenizer)
    uncond = encode_text(text_encoder, [negative_prompt] * n, tokenizer)
    context = torch.cat([uncond, cond]).to(device, dtype)
    patch = patch_of(unet)
    gens = seed_generators(seeds)
    x = initial_noise(gens, patch).to(device, dtype)
    x = x * sched.init_noise_sigma
    total = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        if step_callback is not None:
            step_callback(i, total)
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        eps = unet(inp, t, encoder_hidden_states=context).sample
        e_u, e_c = eps.chunk(2)
        eps = e_u + cfg * (e_c - e_u)
        if guide is not None:
            eps = _guided_eps(x, eps, sched.alphas_cumprod[int(t)].to(x.dtype), guide)
        if "generator" in inspect.signature(sched.step).parameters:
            x = sched.step(eps, t, x, generator=gens).prev_sample
        else:
            x = sched.step(eps, t, x).prev_sample
    return x if return_model_space else to_pixels(x.float(), patch)


def _guided_eps(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, guide: Callable) -> torch.Tensor:
    """ε that makes the step continue from guide(x̂0): x = √ᾱ·x̂0 + √(1−ᾱ)·ε, solved both ways."""
    if alpha_bar < 1e-3:  # pure noise (the cosine schedule's first step): x̂0 is not defined yet
        return eps
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x0 = (x - b * eps) / a
    moved = guide(x0, (b / a).float())
    return (x - a * moved) / b


def diffusion_loss(unet, text_encoder, sched, x0, ids, gen, min_snr: float) -> torch.Tensor:
    """ε-prediction loss at random timesteps, Min-SNR weighted (the base and the LoRAs train on it)."""
    n = x0.shape[0]
    t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    xt = sched.add_noise(x0, noise, t)
    ctx = text_encoder(input_ids=ids).last_hidden_state
    eps = unet(xt, t, encoder_hidden_states=ctx).sample
    per = ((eps.float() - noise) ** 2).mean(dim=(1, 2, 3))
    if min_snr:
        ac = sched.alphas_cumprod[t]
        snr = ac / (1 - ac)
        per = per * torch.clamp(snr, max=min_snr) / snr.clamp(min=1e-8)
    return per.mean()


# --- weights -----------------------------------------------------------------------------------------------


def save_module(module: torch.nn.Module, path, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    sd = {
        k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items() if v.is_floating_point()
    }
    save_file(sd, str(path))


def load_module(module: torch.nn.Module, path) -> torch.nn.Module:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    own = module.state_dict()
    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if own[k].is_floating_point()]
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module


def load_world(weights_dir=None):
    """(unet, text_encoder, tokenizer, config) from the shipped weights (fp32 modules in eval mode)."""
    import json
    from pathlib import Path

    d = Path(weights_dir) if weights_dir else Path(__file__).parent / "weights"
    manifest = json.loads((d / "manifest.json").read_text())
    cfg = WorldConfig.from_dict(manifest["base"]["config"])
    tok = WorldTokenizer()
    unet = load_module(build_unet(cfg), d / "base_unet.safetensors").eval()
    te = load_module(build_text_encoder(cfg, tok), d / "base_text_encoder.safetensors").eval()
    return unet, te, tok, cfg
