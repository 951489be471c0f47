"""Tiny random diffusers/transformers models (real classes, tiny configs) and LoRA files at their shapes."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from lib_klora.tools.synthetic import make_lora_tensors, write_lora

CROSS_DIM = 32


def tiny_unet(sdxl: bool = False) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    extra = {}
    if sdxl:  # SDXL's conditioning: pooled text embeds and size/crop ids ("text_time")
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=CROSS_DIM + 6 * 8,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=2 * CROSS_DIM,
        )
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    config.update(extra)
    return UNet2DConditionModel(**config).eval()


def tiny_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=CROSS_DIM,
        pooled_projection_dim=CROSS_DIM,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_text_encoder(with_projection: bool = False, hidden: int = CROSS_DIM) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=8,
        max_position_embeddings=16,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(model_max_length=16)  # three special tokens; every word is "unknown"


def tiny_vae(latent_channels: int = 4) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def linear_shapes(
    module: nn.Module, prefix: str, contains: Iterable[str] = ("transformer_blocks",)
) -> dict[str, tuple[int, int]]:
    """`prefix`.path -> (out, in) of every nn.Linear whose path contains one of `contains`."""
    words = tuple(contains)
    return {
        f"{prefix}.{name}": (m.out_features, m.in_features)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and any(w in name for w in words) and ".norm" not in name
    }


def write_pair(
    folder: Path, shapes: dict[str, tuple[int, int]], ranks: tuple[int, int] = (4, 8), stem: str = ""
) -> tuple[Path, Path]:
    """A subject and a style LoRA (PEFT keys, alpha = rank) on the same layers."""
    return (
        write_lora(
            folder / f"{stem}subject.safetensors",
            make_lora_tensors(shapes, ranks[0], seed=1, key_format="peft", dtype=torch.float32),
        ),
        write_lora(
            folder / f"{stem}style.safetensors",
            make_lora_tensors(shapes, ranks[1], seed=2, key_format="peft", dtype=torch.float32),
        ),
    )


def snapshot(*modules: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def same_state(before: list[dict[str, torch.Tensor]], *modules: nn.Module) -> bool:
    for saved, module in zip(before, modules, strict=True):
        now = module.state_dict()
        if set(now) != set(saved) or not all(torch.equal(now[k], saved[k]) for k in saved):
            return False
    return True


def hook_count(*modules: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for root in modules for m in root.modules())


def tiny_flux_pipeline():
    """A FluxPipeline around `tiny_flux` (4-channel VAE, packed 16-feature tokens); no text encoders, so
    it runs from `flux_embeds`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=4),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=tiny_flux(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline():
    """A StableDiffusion3Pipeline with a one-block SD3 transformer (4-channel latents, no text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=CROSS_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=CROSS_DIM,
        pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(latent_channels=4),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_embeds(seed: int = 5) -> dict[str, torch.Tensor]:
    """Prompt and pooled embeddings for the encoder-less FLUX and SD3 pipelines."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, 3, CROSS_DIM, generator=generator),
        "pooled_prompt_embeds": torch.randn(1, CROSS_DIM, generator=generator),
    }


def reference_png() -> str:
    """A reference image for guidance, base64 as the parameter model takes it."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 60, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
