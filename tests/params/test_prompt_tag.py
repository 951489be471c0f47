"""The <klora:...> prompt tag: host-identical splitting, overrides of the base params, clear errors."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from lib_klora.params.model import KLoraParams
from lib_klora.params.parsing import ParamsError
from lib_klora.params.prompt_tag import (
    TAG_ALIASES,
    TAG_KEYS,
    find_extra_networks,
    find_tags,
    format_tag,
    params_from_prompt,
    params_from_tag,
    strip_tags,
)


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 99, 199)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


REF = _png()


def host_split(args: str) -> tuple[list[str], dict[str, str]]:
    """What the WebUI's ExtraNetworkParams makes of the text after '<klora:' (reimplemented here)."""
    positional, named = [], {}
    for item in args.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    return positional, named


def tag(text: str, base: KLoraParams | None = None) -> KLoraParams:
    (found,) = find_tags(text)
    return params_from_tag(*found, base)


# ---------------------------------------------------------------- finding and stripping


def test_find_tags_splits_like_the_host() -> None:
    prompt = "a photo <lora:detail:0.5> of <klora:dog:ink:1:0.8:pattern=s*:alpha=1.5>, <klora:cat:oil>"
    assert find_tags(prompt) == [
        (["dog", "ink", "1", "0.8"], {"pattern": "s*", "alpha": "1.5"}),
        (["cat", "oil"], {}),
    ]
    assert find_tags(prompt)[0] == host_split("dog:ink:1:0.8:pattern=s*:alpha=1.5")


def test_find_tags_edge_cases() -> None:
    assert find_tags("no tags here") == []
    assert find_tags("<KLora:dog:ink>") == []  # the host matches network names exactly
    assert find_tags("<klora:>") == []  # the host's regex needs one character after ':'
    # "a=b=c" stays positional, a repeated key keeps the last value, spaces are kept verbatim
    assert find_tags("<klora: dog :ink:a=b=c:alpha=1:alpha=2>") == [
        ([" dog ", "ink", "a=b=c"], {"alpha": "2"})
    ]
    assert find_tags("<klora:dog:ink:alpha=1>") == [host_split("dog:ink:alpha=1")]


def test_find_extra_networks_keeps_every_network_in_order() -> None:
    prompt = "<lora:detail:0.5> x <klora:dog:ink:te=none> <hypernet:h:1>"
    assert find_extra_networks(prompt) == [
        ("lora", ["detail", "0.5"], {}),
        ("klora", ["dog", "ink"], {"te": "none"}),
        ("hypernet", ["h", "1"], {}),
    ]


def test_strip_tags_removes_only_klora() -> None:
    prompt = "a <klora:dog:ink> photo <lora:detail:0.5>, <klora:cat:oil:alpha=2>masterpiece"
    assert strip_tags(prompt) == "a  photo <lora:detail:0.5>, masterpiece"
    assert strip_tags("plain") == "plain"
    assert find_tags(strip_tags(prompt)) == []


def test_format_tag() -> None:
    assert format_tag(["dog", "ink", "1"], {"alpha": "2"}) == "<klora:dog:ink:1:alpha=2>"


# ---------------------------------------------------------------- parameters from a tag


def test_full_example() -> None:
    p = tag("<klora:dog:ink:1:0.8:pattern=s*:alpha=1.5>")
    assert (p.enabled, p.subject, p.style) == (True, "dog", "ink")
    assert (p.subject_strength, p.style_strength, p.pattern, p.alpha) == (1.0, 0.8, "s*", 1.5)
    assert p.effective_beta == 1.3


def test_minimal_tag_enables_with_defaults() -> None:
    assert tag("<klora:dog:ink>") == KLoraParams(enabled=True, subject="dog", style="ink")


def test_tag_overrides_base_and_keeps_the_rest() -> None:
    base = KLoraParams(
        enabled=False,
        subject="old_subject",
        style="old_style",
        subject_strength=0.6,
        style_strength=0.7,
        method="fixed",
        alpha=3.0,
        seed=11,
        show_map=True,
    )
    p = tag("<klora:dog:ink:0.9:alpha=2>", base)
    assert (p.enabled, p.subject, p.style) == (True, "dog", "ink")
    assert (p.subject_strength, p.style_strength) == (0.9, 0.7)  # style strength kept from base
    assert (p.method, p.alpha, p.seed, p.show_map) == ("fixed", 2.0, 11, True)
    assert base.alpha == 3.0  # base is not changed


def test_empty_subject_strength_keeps_base_and_sets_style_strength() -> None:
    p = tag("<klora:dog:ink::0.5>", KLoraParams(subject_strength=0.3))
    assert (p.subject_strength, p.style_strength) == (0.3, 0.5)


def test_items_are_trimmed_and_keys_case_insensitive() -> None:
    p = tag("<klora: dog : ink : 0.5 :Pattern= S_star : Alpha=2 >")
    assert (p.subject, p.style, p.subject_strength, p.pattern, p.alpha) == ("dog", "ink", 0.5, "s*", 2.0)


def test_every_named_key() -> None:
    p = tag(
        "<klora:dog:ink:subject_strength=0.5:style_strength=-1:method=random:pattern=s*:alpha=2:beta=0.2"
        ":gamma=paper:seed=5:te=subject:hires=separate:hr_method=merge:hr_pattern=s:hr_alpha=1:hr_beta=0.3"
        ":map=true>"
    )
    assert p.to_dict() == {
        **KLoraParams().to_dict(),
        "enabled": True,
        "subject": "dog",
        "style": "ink",
        "subject_strength": 0.5,
        "style_strength": -1.0,
        "method": "random",
        "pattern": "s*",
        "alpha": 2.0,
        "beta": 0.2,
        "gamma": "paper",
        "seed": 5,
        "te_policy": "subject",
        "hires": "separate",
        "hires_method": "merge",
        "hires_pattern": "s",
        "hires_alpha": 1.0,
        "hires_beta": 0.3,
        "show_map": True,
    }
    long_names = tag("<klora:dog:ink:te_policy=none:hires_alpha=4:show_map=false>")
    assert (long_names.te_policy, long_names.hires_alpha, long_names.show_map) == ("none", 4.0, False)


def test_tag_keys_table() -> None:
    assert set(TAG_ALIASES.values()) <= set(TAG_KEYS.values())
    assert not {"enabled", "subject", "style"} & set(TAG_KEYS)
    assert TAG_KEYS["te"] == "te_policy" and TAG_KEYS["alpha"] == "alpha"


def test_beta_default_word_resets_to_pattern_default() -> None:
    p = tag("<klora:dog:ink:pattern=s*:beta=default>", KLoraParams(beta=0.9))
    assert p.beta is None and p.effective_beta == 1.3


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<klora:dog:ink:abc>", "<klora:dog:ink:abc>: subject strength 'abc' is not a number"),
        ("<klora:dog:ink:1:x>", "<klora:dog:ink:1:x>: style strength 'x' is not a number"),
        ("<klora:dog>", "<klora:dog>: missing style LoRA"),
        ("<klora:dog::1>", "<klora:dog::1>: missing style LoRA"),
        ("<klora::ink>", "<klora::ink>: missing subject LoRA"),
        ("<klora:alpha=1>", "<klora:alpha=1>: missing subject LoRA"),
        ("<klora:dog:ink:1:1:2>", "<klora:dog:ink:1:1:2>: unexpected item '2'"),
        ("<klora:dog:ink:alpha=1=2>", "'alpha=1=2' is not a key=value item"),
        ("<klora:dog:ink:1:1:a=b=c>", "'a=b=c' is not a key=value item"),
        ("<klora:dog:ink:alpah=2>", "<klora:dog:ink:alpah=2>: unknown key 'alpah' (did you mean 'alpha'?)"),
        ("<klora:dog:ink:enabled=false>", "unknown key 'enabled'"),
        ("<klora:dog:ink:subject=cat>", "unknown key 'subject'"),
        ("<klora:dog:ink:alpha=-1>", "<klora:dog:ink:alpha=-1>: 'alpha': must be > 0 (got '-1')"),
        ("<klora:dog:ink:te=all>", "'te': must be one of 'both', 'subject', 'style', 'none' (got 'all')"),
        ("<klora:dog:ink:pattern=q>", "'pattern': must be one of 's', 's*'"),
        ("<klora:dog:ink:method=__import__('os')>", "'method': must be one of"),
        ("<klora:dog:ink:seed=1e3.5>", "'seed': must be a number"),
        ("<klora:dog:ink:9>", "'subject strength': must be <= 5 (got '9')"),
        ("<klora:dog:ink:1:nan>", "'style strength': must be a finite number"),
        ("<klora:dog:dog>", "'style LoRA': must be a different LoRA from the subject ('dog')"),
        ("<klora:../dog:ink>", "'subject LoRA': must be a LoRA name from the WebUI's list, not a path"),
        ("<klora:dog:ink\\x>", "'style LoRA': must be a LoRA name from the WebUI's list, not a path"),
        ("<klora:dog:ink:1:subject_strength=2>", "'subject strength' and 'subject_strength' set the same"),
        ("<klora:dog:ink:te=none:te_policy=both>", "'te' and 'te_policy' set the same parameter"),
    ],
)
def test_bad_tags_name_the_offending_item(text: str, message: str) -> None:
    with pytest.raises(ParamsError) as info:
        tag(text)
    assert message in str(info.value)


def test_tag_error_is_a_valueerror_with_fields() -> None:
    with pytest.raises(ValueError) as info:
        tag("<klora:dog:ink:alpha=-1:beta=20>")
    assert isinstance(info.value, ParamsError)
    assert set(info.value.fields) == {"alpha", "beta"}


def test_nothing_is_evaluated() -> None:
    # Values reach only float()/int()/membership checks; an expression is just a wrong value.
    with pytest.raises(ParamsError, match="must be a number"):
        tag("<klora:dog:ink:alpha=1+1>")
    with pytest.raises(ParamsError, match="must be a number"):
        tag("<klora:dog:ink:seed=2**8>")


# ---------------------------------------------------------------- whole prompts (API pre-validation)


def test_params_from_prompt() -> None:
    assert params_from_prompt("a photo <lora:x:1>") is None
    p = params_from_prompt("a <klora:dog:ink:alpha=2> b <klora:cat:oil>")
    assert p is not None and (p.subject, p.alpha) == ("dog", 2.0)  # the first tag is the one used
    with pytest.raises(ParamsError, match="<klora:cat:oil:beta=x>"):
        params_from_prompt("a <klora:dog:ink> b <klora:cat:oil:beta=x>")  # a later bad tag still fails


def test_params_from_prompt_uses_base() -> None:
    base = KLoraParams(method="merge")
    p = params_from_prompt("<klora:dog:ink>", base)
    assert p is not None and p.method == "merge"


def test_dynamic_and_guidance_keys() -> None:
    p = tag(
        "<klora:dog:ink:method=dynamic:kl_temperature=2:kl_direction=symmetric:kl_per_sample=true:kl_hybrid=true"
        ":guidance=true:guidance_text=0.5:eta=0.1:guidance_start=0.2:guidance_end=0.7:guidance_every=2"
        ":guidance_iters=2:guidance_decoder=vae:clip=ViT-L-14/openai:dino=vit_base_patch16_224.dino>"
    )
    assert (p.method, p.kl_temperature, p.kl_direction, p.kl_per_sample, p.kl_hybrid) == (
        "dynamic",
        2.0,
        "symmetric",
        True,
        True,
    )
    assert (p.guidance, p.guidance_text, p.guidance_eta, p.guidance_start, p.guidance_end) == (
        True,
        0.5,
        0.1,
        0.2,
        0.7,
    )
    assert (p.guidance_every, p.guidance_iters, p.guidance_decoder) == (2, 2, "vae")
    assert (p.clip_model, p.dino_model) == ("ViT-L-14/openai", "vit_base_patch16_224.dino")


def test_reference_images_cannot_be_written_in_a_tag_but_come_from_the_base() -> None:
    with pytest.raises(ParamsError, match="unknown key 'style_refs'"):
        tag("<klora:dog:ink:style_refs=abc>")
    base = KLoraParams(style_refs=[REF])
    p = tag("<klora:dog:ink:guidance=true>", base)
    assert p.style_refs == (REF,) and p.uses_guidance
    with pytest.raises(ParamsError, match="no reference images"):
        tag("<klora:dog:ink:guidance=true>")
