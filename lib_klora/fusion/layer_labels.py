"""Short, readable row labels for selection maps: ``down 1.0 attn2 to_k`` instead of a 70-character key.

Works on every spelling a layer name arrives in (kohya ``lora_unet_down_blocks_1_…``, canonical
``unet:down_blocks_1_…``, diffusers or LDM paths, text encoders, FLUX blocks). The group is the block a
layer sits in, so a map can draw a separator wherever the block changes. Unknown names keep their last
few parts, never an error.
"""

from __future__ import annotations

import re

_PREFIX = re.compile(r"^(?:lora_|lycoris_)?(?:unet|transformer|te\d?|text_encoder(?:_\d)?|other)[:_.]")
_ENCODER = re.compile(r"^(?:lora_)?(?:te(\d?)[_:]|text_encoder(?:_(\d))?[_:])")
_TE = re.compile(r"(?:^|_)(?:text_model_)?encoder_layers_(\d+)_(.+)$")
_BLOCKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(down|up)_blocks_(\d+)_attentions_(\d+)_(.+)$"), "{0} {1}.{2}"),
    (re.compile(r"^(down|up)_blocks_(\d+)_resnets_(\d+)_(.+)$"), "{0} {1} res{2}"),
    (re.compile(r"^(down|up)_blocks_(\d+)_(downsamplers|upsamplers)_0_(.+)$"), "{0} {1} {2}"),
    (re.compile(r"^mid_block_attentions_(\d+)_(.+)$"), "mid"),
    (re.compile(r"^mid_block_resnets_(\d+)_(.+)$"), "mid res{0}"),
    (re.compile(r"^input_blocks_(\d+)_(\d+)_(.+)$"), "in {0}.{1}"),
    (re.compile(r"^output_blocks_(\d+)_(\d+)_(.+)$"), "out {0}.{1}"),
    (re.compile(r"^middle_block_(\d+)_(.+)$"), "mid {0}"),
    (re.compile(r"^double_blocks_(\d+)_(.+)$"), "double {0}"),
    (re.compile(r"^single_blocks_(\d+)_(.+)$"), "single {0}"),
    (re.compile(r"^single_transformer_blocks_(\d+)_(.+)$"), "single {0}"),
    (re.compile(r"^transformer_blocks_(\d+)_(.+)$"), "block {0}"),
)
_TAIL_WORDS = (
    (re.compile(r"^transformer_blocks_(\d+)_"), lambda m: "" if m.group(1) == "0" else f"t{m.group(1)} "),
    (re.compile(r"ff_net_0_proj$"), lambda m: "ff in"),
    (re.compile(r"ff_net_2$"), lambda m: "ff out"),
    (re.compile(r"to_out_0$"), lambda m: "to_out"),
    (re.compile(r"(attn\d?|self_attn|mlp|img_attn|txt_attn|img_mlp|txt_mlp)_"), lambda m: f"{m.group(1)} "),
)


def _tail(rest: str) -> str:
    for pattern, replace in _TAIL_WORDS:
        rest = pattern.sub(replace, rest)
    return rest.strip()


def layer_label(name: str) -> tuple[str, str]:
    """(group, short label) of one layer name."""
    text = name.strip().replace(".", "_")
    encoder = _ENCODER.match(text)
    text = _PREFIX.sub("", text, count=1).lstrip("_:")
    te = _TE.search(text)
    if te is not None or encoder is not None:
        which = "te" + (encoder.group(1) or encoder.group(2) or "") if encoder is not None else "te"
        if te is None:
            return which, f"{which} " + " ".join(text.split("_")[-3:])
        group = f"{which} L{te.group(1)}"
        return group, f"{group} {_tail(te.group(2))}"
    for pattern, group_format in _BLOCKS:
        match = pattern.match(text)
        if match is not None:
            *head, rest = match.groups()
            group = group_format.format(*head)
            return group, f"{group} {_tail(rest)}".strip()
    parts = text.split("_")
    return "", " ".join(parts[-4:])


def layer_groups_and_labels(names: list[str]) -> tuple[list[str], list[str]]:
    """Groups and labels of every row; labels that would repeat keep more of their name, so rows differ."""
    pairs = [layer_label(name) for name in names]
    groups, labels = [g for g, _ in pairs], [label for _, label in pairs]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    for i, label in enumerate(labels):
        if seen[label] > 1:
            labels[i] = names[i]  # an unusual name the rules above folded together: show it whole
    return groups, labels
