from __future__ import annotations

import pytest

from lib_klora.fusion.layer_labels import layer_groups_and_labels, layer_label
from lib_klora.fusion.selection_map import GRID_BOX_KEY, SEPARATOR, render_selection_map


@pytest.mark.parametrize(
    ("name", "group", "label"),
    [
        (
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
            "down 1.0",
            "down 1.0 attn2 to_k",
        ),
        (
            "unet:down_blocks_1_attentions_0_transformer_blocks_3_ff_net_0_proj",
            "down 1.0",
            "down 1.0 t3 ff in",
        ),
        ("up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0", "up 2.1", "up 2.1 attn1 to_out"),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2", "mid", "mid ff out"),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "in 4.1", "in 4.1 attn1 to_q"),
        ("lora_te1_text_model_encoder_layers_3_self_attn_q_proj", "te1 L3", "te1 L3 self_attn q_proj"),
        ("text_encoder_2.text_model.encoder.layers.1.mlp.fc1", "te2 L1", "te2 L1 mlp fc1"),
        ("lora_unet_double_blocks_0_img_attn_qkv", "double 0", "double 0 img_attn qkv"),
        ("lora_unet_single_blocks_7_linear1", "single 7", "single 7 linear1"),
        ("lora_unet_up_blocks_1_resnets_0_conv1", "up 1 res0", "up 1 res0 conv1"),
        ("some_unknown_layer", "", "some unknown layer"),
    ],
)
def test_every_name_spelling_gets_a_short_label_and_its_block(name: str, group: str, label: str) -> None:
    assert layer_label(name) == (group, label)


def test_names_the_rules_fold_together_stay_whole() -> None:
    names = ["a_x_y_z_w", "b_x_y_z_w", "lora_unet_mid_block_attentions_0_proj_in"]
    groups, labels = layer_groups_and_labels(names)
    assert labels == ["a_x_y_z_w", "b_x_y_z_w", "mid proj_in"]
    assert groups == ["", "", "mid"]


def test_the_map_separates_blocks_with_a_line() -> None:
    names = [f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in "qkv"]
    names += [f"lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_{p}" for p in "qkv"]
    img = render_selection_map(names, [[0, 1]] * 6)
    x, y, w, h = img.info[GRID_BOX_KEY]
    pitch = h / 6
    boundary = y + int(3 * pitch)
    assert img.getpixel((x + w // 2, boundary)) == SEPARATOR
    inside = y + int(1 * pitch)  # between two rows of the same block: no line
    assert img.getpixel((x + 1, inside)) != SEPARATOR
