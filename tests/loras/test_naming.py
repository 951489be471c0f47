"""Key parsing and canonical layer names across kohya, old diffusers and PEFT LoRA files."""

from __future__ import annotations

import re

import pytest

from lib_klora.loras.naming import ParsedKey, align_text_encoder, detect_base_architecture, parse_lora_key

ATTN1_Q = "unet:down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def canon(key: str) -> str:
    parsed = parse_lora_key(key)
    assert parsed is not None, key
    return parsed.canonical


# --- the three formats -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
            ParsedKey(
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                ATTN1_Q,
                "down",
                "kohya",
            ),
        ),
        (
            "unet.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight",
            ParsedKey(
                "unet.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                ATTN1_Q,
                "up",
                "diffusers",
            ),
        ),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
            ParsedKey(
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                ATTN1_Q,
                "down",
                "diffusers",
            ),
        ),
        (
            "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
            ParsedKey(
                "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                ATTN1_Q,
                "down",
                "peft",
            ),
        ),
        (
            "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.default.weight",
            ParsedKey(
                "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                ATTN1_Q,
                "up",
                "peft",
            ),
        ),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.my_style.weight",
            ParsedKey(
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ATTN1_Q, "down", "peft"
            ),
        ),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
            ParsedKey(
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
                ATTN1_Q,
                "down",
                "diffusers",
            ),
        ),
    ],
)
def test_formats_parse_to_the_same_layer(key: str, expected: ParsedKey) -> None:
    assert parse_lora_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight",
        "unet.unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight",
        "base_model.model.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
    ],
)
def test_to_out_0_from_every_format(key: str) -> None:
    assert canon(key) == "unet:mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"


@pytest.mark.parametrize(
    ("key", "part", "fmt"),
    [
        ("lora_unet_down_blocks_0_resnets_0_conv1.alpha", "alpha", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", "mid", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a", "hada_w1_a", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.hada_t2", "hada_t2", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1", "lokr_w1", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.dora_scale", "dora_scale", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.diff", "diff", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.diff_b", "diff_b", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.on_input", "on_input", "kohya"),
        ("lora_unet_down_blocks_0_resnets_0_conv1.bias", "bias", "kohya"),
        ("unet.down_blocks.0.resnets.0.conv1.alpha", "alpha", "diffusers"),
        ("unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector", "dora_scale", "peft"),
        ("unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector.default.weight", "dora_scale", "peft"),
        ("unet.down_blocks.0.resnets.0.conv1.lora_B.bias", "lora_B.bias", "diffusers"),
        ("unet.down_blocks.0.resnets.0.conv1.hada_w1_a", "hada_w1_a", "diffusers"),
    ],
)
def test_parts(key: str, part: str, fmt: str) -> None:
    parsed = parse_lora_key(key)
    assert parsed is not None
    assert (parsed.canonical, parsed.part, parsed.format) == ("unet:down_blocks_0_resnets_0_conv1", part, fmt)


# --- LDM/compvis -> diffusers -------------------------------------------------------------------

SD1_ATTENTIONS = [
    ("input_blocks_1_1", "down_blocks_0_attentions_0"),
    ("input_blocks_2_1", "down_blocks_0_attentions_1"),
    ("input_blocks_4_1", "down_blocks_1_attentions_0"),
    ("input_blocks_5_1", "down_blocks_1_attentions_1"),
    ("input_blocks_7_1", "down_blocks_2_attentions_0"),
    ("input_blocks_8_1", "down_blocks_2_attentions_1"),
    ("middle_block_1", "mid_block_attentions_0"),
    ("output_blocks_3_1", "up_blocks_1_attentions_0"),
    ("output_blocks_4_1", "up_blocks_1_attentions_1"),
    ("output_blocks_5_1", "up_blocks_1_attentions_2"),
    ("output_blocks_6_1", "up_blocks_2_attentions_0"),
    ("output_blocks_7_1", "up_blocks_2_attentions_1"),
    ("output_blocks_8_1", "up_blocks_2_attentions_2"),
    ("output_blocks_9_1", "up_blocks_3_attentions_0"),
    ("output_blocks_10_1", "up_blocks_3_attentions_1"),
    ("output_blocks_11_1", "up_blocks_3_attentions_2"),
]


# attention sub-layers: (kohya underscore form, dotted form)
ATTN_RESTS = [
    ("transformer_blocks_0_attn2_to_k", "transformer_blocks.0.attn2.to_k"),
    ("proj_in", "proj_in"),
    ("proj_out", "proj_out"),
    ("norm", "norm"),
]


@pytest.mark.parametrize(("ldm", "diffusers"), SD1_ATTENTIONS)
@pytest.mark.parametrize(("rest", "dotted_rest"), ATTN_RESTS)
def test_ldm_attentions(ldm: str, diffusers: str, rest: str, dotted_rest: str) -> None:
    assert canon(f"lora_unet_{ldm}_{rest}.lora_down.weight") == f"unet:{diffusers}_{rest}"
    # dotted LDM names (ComfyUI/SAI style "diffusion_model.input_blocks.4.1.") take the same route
    dotted_ldm = re.sub(r"_(\d+)", r".\1", ldm)
    key = f"diffusion_model.{dotted_ldm}.{dotted_rest}.lora_A.weight"
    assert canon(key) == f"unet:{diffusers}_{rest}"


@pytest.mark.parametrize(
    ("kohya", "diffusers_key"),
    [
        (
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        ),
        (
            "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj.lora_down.weight",
            "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj.lora.down.weight",
        ),
        (
            "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
            "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight",
        ),
        (
            "lora_unet_output_blocks_5_1_proj_out.alpha",
            "unet.up_blocks.1.attentions.2.proj_out.alpha",
        ),
        (
            "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_out_0.lora_up.weight",
            "unet.mid_block.attentions.0.transformer_blocks.3.attn1.to_out.0.lora_B.weight",
        ),
    ],
)
def test_sdxl_kohya_compvis_pairs_with_diffusers(kohya: str, diffusers_key: str) -> None:
    assert canon(kohya) == canon(diffusers_key)
    assert canon(kohya).startswith("unet:") and "blocks_" in canon(kohya)


@pytest.mark.parametrize(
    ("ldm", "diffusers"),
    [
        ("input_blocks_1_0_in_layers_2", "down_blocks_0_resnets_0_conv1"),
        ("input_blocks_2_0_out_layers_3", "down_blocks_0_resnets_1_conv2"),
        ("input_blocks_4_0_skip_connection", "down_blocks_1_resnets_0_conv_shortcut"),
        ("input_blocks_11_0_emb_layers_1", "down_blocks_3_resnets_1_time_emb_proj"),
        ("input_blocks_7_0_in_layers_0", "down_blocks_2_resnets_0_norm1"),
        ("middle_block_0_in_layers_2", "mid_block_resnets_0_conv1"),
        ("middle_block_2_out_layers_0", "mid_block_resnets_1_norm2"),
        ("output_blocks_0_0_emb_layers_1", "up_blocks_0_resnets_0_time_emb_proj"),
        ("output_blocks_5_0_skip_connection", "up_blocks_1_resnets_2_conv_shortcut"),
        ("output_blocks_11_0_out_layers_3", "up_blocks_3_resnets_2_conv2"),
        ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
        ("input_blocks_6_0_op", "down_blocks_1_downsamplers_0_conv"),
        ("input_blocks_9_0_op", "down_blocks_2_downsamplers_0_conv"),
        ("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv"),  # SD1: level without attention
        ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),  # SDXL: level with attention
        ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
        ("output_blocks_8_2_conv", "up_blocks_2_upsamplers_0_conv"),
        ("input_blocks_0_0", "conv_in"),
        ("out_0", "conv_norm_out"),
        ("out_2", "conv_out"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("label_emb_0_0", "add_embedding_linear_1"),
        ("label_emb_0_2", "add_embedding_linear_2"),
    ],
)
def test_ldm_resnets_samplers_and_singletons(ldm: str, diffusers: str) -> None:
    assert canon(f"lora_unet_{ldm}.lora_down.weight") == f"unet:{diffusers}"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("lora_unet_input_blocks_4_1_mystery_layer.lora_down.weight", "unet:input_blocks_4_1_mystery_layer"),
        ("lora_unet_output_blocks_4_0_mystery.lora_down.weight", "unet:output_blocks_4_0_mystery"),
        ("lora_unet_middle_block_1_mystery.lora_down.weight", "unet:middle_block_1_mystery"),
        ("lora_unet_input_blocks_0_0_extra.lora_down.weight", "unet:input_blocks_0_0_extra"),
        ("lora_unet_some_custom_adapter.lora_down.weight", "unet:some_custom_adapter"),
        ("unet.some.custom.adapter.lora.down.weight", "unet:some_custom_adapter"),
        (
            "lora_unet_up_blocks_1_attentions_2_proj_out.lora_down.weight",
            "unet:up_blocks_1_attentions_2_proj_out",
        ),
        ("lora_prior_unet_down_blocks_0_x.lora_down.weight", "other:prior_unet_down_blocks_0_x"),
    ],
)
def test_unrecognised_names_pass_through(key: str, expected: str) -> None:
    assert canon(key) == expected


# --- text encoders and DiTs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "te"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight", "te"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight", "te"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight", "te"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "te"),
        ("base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "te"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "te1"),
        ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "te2"),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", "te2"),
    ],
)
def test_text_encoders(key: str, expected: str) -> None:
    assert canon(key) == f"{expected}:text_model_encoder_layers_0_self_attn_q_proj"


def test_text_encoder_processor_out_proj() -> None:
    key = "text_encoder.text_model.encoder.layers.3.self_attn.to_out_lora.up.weight"
    assert canon(key) == "te:text_model_encoder_layers_3_self_attn_out_proj"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "unet:double_blocks_0_img_attn_qkv"),
        ("diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight", "unet:double_blocks_0_img_attn_qkv"),
        ("lora_unet_single_blocks_7_linear1.lora_up.weight", "unet:single_blocks_7_linear1"),
        (
            "lora_unet_joint_blocks_0_context_block_attn_qkv.alpha",
            "unet:joint_blocks_0_context_block_attn_qkv",
        ),
        (
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
            "transformer:single_transformer_blocks_0_attn_to_q",
        ),
        (
            "transformer.transformer_blocks.3.attn.to_out.0.lora_B.weight",
            "transformer:transformer_blocks_3_attn_to_out_0",
        ),
        (
            "base_model.model.transformer_blocks.3.attn.add_q_proj.lora_A.weight",
            "transformer:transformer_blocks_3_attn_add_q_proj",
        ),
        ("transformer_blocks.3.ff.net.2.lora_B.weight", "transformer:transformer_blocks_3_ff_net_2"),
        (
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
            "te3:encoder_block_0_layer_0_SelfAttention_q",
        ),
    ],
)
def test_dit_names(key: str, expected: str) -> None:
    assert canon(key) == expected


def test_bare_dotted_unet_path_is_unet() -> None:
    parsed = parse_lora_key("down_blocks.1.attentions.0.proj_in.lora_A.weight")
    assert parsed == ParsedKey(
        "down_blocks.1.attentions.0.proj_in", "unet:down_blocks_1_attentions_0_proj_in", "down", "peft"
    )


@pytest.mark.parametrize(
    "key", ["", "lora_unet_down_blocks_0_resnets_0_conv1", "bundle_emb.style.string_to_param.*", ".alpha"]
)
def test_non_module_keys_give_none(key: str) -> None:
    assert parse_lora_key(key) is None


def test_never_raises_on_garbage() -> None:
    assert parse_lora_key(None) is None  # type: ignore[arg-type]
    for key in [
        "...",
        "a..b",
        "unet.",
        "lora_unet_.alpha",
        "base_model.model.lora_A.weight",
        "unet.unet.alpha",
    ]:
        parse_lora_key(key)


@pytest.mark.parametrize(
    ("canonical", "arch", "expected"),
    [
        ("te:text_model_encoder_layers_0_mlp_fc1", "sdxl", "te1:text_model_encoder_layers_0_mlp_fc1"),
        ("te:text_model_encoder_layers_0_mlp_fc1", "sd1", "te:text_model_encoder_layers_0_mlp_fc1"),
        (
            "te2:encoder_block_0_layer_0_SelfAttention_q",
            "flux",
            "te3:encoder_block_0_layer_0_SelfAttention_q",
        ),
        ("te2:text_model_encoder_layers_0_mlp_fc1", "sdxl", "te2:text_model_encoder_layers_0_mlp_fc1"),
        ("unet:conv_in", "sdxl", "unet:conv_in"),
    ],
)
def test_align_text_encoder(canonical: str, arch: str, expected: str) -> None:
    assert align_text_encoder(canonical, arch) == expected


# --- base architecture --------------------------------------------------------------------------

SD_KV = "unet:down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
        ({"ss_base_model_version": "sd_v1"}, "sd1"),
        ({"ss_base_model_version": "sd_v2_768_v"}, "sd2"),
        ({"ss_base_model_version": "flux1"}, "flux"),
        ({"ss_base_model_version": "sd3"}, "sd3"),
        ({"ss_v2": "True"}, "sd2"),
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
        ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
        ({"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3"),
    ],
)
def test_detect_from_metadata_wins(metadata: dict[str, str], expected: str) -> None:
    # the keys alone say sd1; recognised metadata must override them
    assert detect_base_architecture({SD_KV: 768}, metadata) == expected


def test_unrecognised_metadata_falls_back_to_keys() -> None:
    metadata = {"ss_base_model_version": "something_new", "ss_v2": "False", "modelspec.architecture": ""}
    assert detect_base_architecture({SD_KV: 1024}, metadata) == "sd2"
    assert detect_base_architecture({}, metadata) is None
    assert detect_base_architecture({}, None) is None


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        ({SD_KV: 768}, "sd1"),
        ({SD_KV.replace("to_k", "to_v"): 1024}, "sd2"),
        ({"unet:up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": 2048}, "sdxl"),
        ({"te1:text_model_encoder_layers_0_self_attn_q_proj": 768}, "sdxl"),
        ({"te2:text_model_encoder_layers_0_self_attn_q_proj": 1280, SD_KV: 768}, "sdxl"),
        ({"unet:down_blocks_2_attentions_0_transformer_blocks_5_attn1_to_q": 1280}, "sdxl"),
        ({"unet:double_blocks_0_img_attn_qkv": 3072, "te1:text_model_encoder_layers_0_mlp_fc1": 768}, "flux"),
        ({"transformer:single_transformer_blocks_0_attn_to_q": 3072}, "flux"),
        ({"transformer:transformer_blocks_0_attn_to_q": 3072}, "flux"),
        ({"transformer:transformer_blocks_0_attn_to_q": 1536}, "sd3"),
        ({"unet:joint_blocks_0_context_block_attn_qkv": 1536, "te1:x": 768}, "sd3"),
        ({"te:text_model_encoder_layers_0_self_attn_k_proj": 768}, "sd1"),
        ({"te:text_model_encoder_layers_0_self_attn_k_proj": 1024}, "sd2"),
        ({"unet:down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": 320}, None),
        ({SD_KV: 999}, None),
    ],
)
def test_detect_from_keys(features: dict[str, int], expected: str | None) -> None:
    assert detect_base_architecture(features, {}) == expected


def test_detect_from_parsed_kohya_compvis_sdxl_file() -> None:
    parsed = parse_lora_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v.lora_down.weight")
    assert parsed is not None
    assert detect_base_architecture({parsed.canonical: 2048}, None) == "sdxl"


@pytest.mark.parametrize(
    ("key", "canonical", "part"),
    [
        (  # OneTrainer FLUX
            "lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight",
            "transformer:single_transformer_blocks_0_attn_to_q",
            "down",
        ),
        (  # LyCORIS' own prefix on a UNet: the path tells the component
            "lycoris_down_blocks_0_attentions_0_proj_in.hada_w1_a",
            "unet:down_blocks_0_attentions_0_proj_in",
            "hada_w1_a",
        ),
        (  # ... and on a FLUX transformer (SimpleTuner)
            "lycoris_single_transformer_blocks_0_attn_to_q.lokr_w2_b",
            "transformer:single_transformer_blocks_0_attn_to_q",
            "lokr_w2_b",
        ),
        (
            "double_blocks.0.processor.qkv_lora1.down.weight",
            "unet:double_blocks_0_processor_qkv_lora1",
            "down",
        ),
        ("single_blocks.3.processor.proj_lora.up.weight", "unet:single_blocks_3_processor_proj_lora", "up"),
    ],
)
def test_trainer_prefixes_and_xlabs_keys(key: str, canonical: str, part: str) -> None:
    parsed = parse_lora_key(key)
    assert parsed is not None and (parsed.canonical, parsed.part) == (canonical, part)
