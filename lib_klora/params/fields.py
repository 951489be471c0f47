"""The parameters' vocabulary: choices, limits, labels, hover help and infotext keys (torch-free).

Choices come from the fusion's one vocabulary (lib_klora.fusion.options), so the UI, the API schema,
the prompt tag and the X/Y/Z axes offer exactly the methods and patterns the engines know.
"""

from __future__ import annotations

from typing import Literal

from lib_klora.fusion.options import GammaVariant, Method, Pattern

MethodName = Literal[tuple(m.value for m in Method)]  # type: ignore[valid-type]
PatternName = Literal[tuple(p.value for p in Pattern)]  # type: ignore[valid-type]
GammaName = Literal[tuple(g.value for g in GammaVariant)]  # type: ignore[valid-type]
TePolicy = Literal["both", "subject", "style", "none"]
HiresMode = Literal["same", "off", "separate"]
KlDirection = Literal["forward", "symmetric"]
DecoderName = Literal["taesd", "vae"]

CHOICES: dict[str, tuple[str, ...]] = {
    "method": tuple(m.value for m in Method),
    "pattern": tuple(p.value for p in Pattern),
    "gamma": tuple(g.value for g in GammaVariant),
    "te_policy": ("both", "subject", "style", "none"),
    "hires": ("same", "off", "separate"),
    "hires_method": tuple(m.value for m in Method),
    "hires_pattern": tuple(p.value for p in Pattern),
    "kl_direction": ("forward", "symmetric"),
    "guidance_decoder": ("taesd", "vae"),
}

MAX_NAME_LENGTH = 255
MAX_SEED = 2**32 - 1  # the WebUI's own seed range
STRENGTH_LIMIT = 5.0
ALPHA_LIMIT = 10.0
BETA_LIMIT = 10.0
TEMPERATURE_LIMIT = 100.0
GUIDANCE_WEIGHT_LIMIT = 10.0
ETA_LIMIT = 1.0
MAX_GUIDANCE_EVERY = 1000
MAX_GUIDANCE_ITERS = 10
MAX_REFERENCES = 16  # per kind; each one is embedded once per job
MAX_REFERENCE_TEXT = 48 * 1024 * 1024  # base64 characters of one reference (about 36 MB of file)
MAX_MODEL_NAME = 120
DEFAULT_CLIP_MODEL = "ViT-B-32:laion2b_s34b_b79k"  # open_clip MODEL:PRETRAINED
DEFAULT_DINO_MODEL = "vit_small_patch16_224.dino"  # timm model name

FIELD_LABELS: dict[str, str] = {
    "enabled": "Enable K-LoRA",
    "subject": "Subject LoRA",
    "style": "Style LoRA",
    "subject_strength": "Subject strength",
    "style_strength": "Style strength",
    "method": "Method",
    "pattern": "Time-scale pattern",
    "alpha": "Alpha (slope)",
    "beta": "Beta (offset)",
    "gamma": "Balance factor γ",
    "seed": "Random-baseline seed",
    "te_policy": "Text-encoder LoRAs",
    "hires": "Hires pass",
    "hires_method": "Hires method",
    "hires_pattern": "Hires pattern",
    "hires_alpha": "Hires alpha",
    "hires_beta": "Hires beta",
    "show_map": "Show selection map",
    "kl_temperature": "KL temperature",
    "kl_direction": "KL direction",
    "kl_per_sample": "Decide per image",
    "kl_hybrid": "Hybrid with K-LoRA time scale",
    "guidance": "Enable reference guidance",
    "guidance_style": "Style weight (CLIP)",
    "guidance_subject": "Subject weight (DINO)",
    "guidance_subject_clip": "Subject weight (CLIP)",
    "guidance_text": "Prompt weight (CLIP text)",
    "guidance_eta": "Step size η",
    "guidance_start": "Guidance start",
    "guidance_end": "Guidance end",
    "guidance_every": "Guide every k-th step",
    "guidance_iters": "Gradient steps per guided step",
    "guidance_decoder": "Decoder for guidance",
    "clip_model": "CLIP model",
    "dino_model": "DINO model",
    "style_refs": "Style reference images",
    "subject_refs": "Subject reference images",
}

FIELD_HELP: dict[str, str] = {
    "enabled": "Fuse the subject LoRA and the style LoRA layer by layer for this generation.",
    "subject": "LoRA of the content (a person, an object): a name from the WebUI's LoRA list, not a path.",
    "style": "LoRA of the look: a name from the WebUI's LoRA list, not a path; must differ from the subject.",
    "subject_strength": "Multiplier of the subject LoRA, as in <lora:name:strength> (-5 to 5).",
    "style_strength": "Multiplier of the style LoRA, as in <lora:name:strength> (-5 to 5).",
    "method": (
        "klora: per-layer choice by Top-K scores and a time scale (the paper). merge: both LoRAs everywhere. "
        "fixed: switch by time only. random: a seeded random choice per layer (baselines for comparison). "
        "dynamic: per layer and step, the LoRA whose output differs more (KL) from the base output."
    ),
    "pattern": "s: subject early, style late. s*: style first, a wrap back to the subject, then style again.",
    "alpha": "Slope of the time scale S(r) = alpha·r + beta; larger hands layers to the style sooner (0-10).",
    "beta": "Offset of the time scale; empty uses the pattern's default (0.5 for s, 1.3 for s*).",
    "gamma": "official: mean of per-layer ratios without outliers (released code); paper: ratio of sums.",
    "seed": "Seed of the random baseline only; other methods ignore it (0 to 4294967295).",
    "te_policy": "Which LoRAs' text-encoder parts apply: both, the subject's, the style's, or none.",
    "hires": "Hires fix pass: same settings, no K-LoRA at all, or the separate hires settings below.",
    "hires_method": "Method for the hires pass when 'separate'; empty keeps the first pass's method.",
    "hires_pattern": "Pattern for the hires pass when 'separate'; empty keeps the first pass's pattern.",
    "hires_alpha": "Alpha for the hires pass when 'separate'; empty keeps the first pass's alpha.",
    "hires_beta": "Beta for the hires pass when 'separate'; empty keeps the first pass's beta.",
    "show_map": "Append an image of which LoRA each layer used at each step to the outputs.",
    "kl_temperature": "Method dynamic: softmax temperature of the distributions KL compares (>0-100).",
    "kl_direction": "Method dynamic: forward KL(base‖LoRA), or symmetric (both directions added).",
    "kl_per_sample": "Method dynamic: decide per image of the batch (cond and uncond may then differ).",
    "kl_hybrid": "Method dynamic: scale the style divergence by K-LoRA's S(t) (pattern, alpha, beta).",
    "guidance": (
        "Nudge each step's denoised image towards the reference images (CLIP for style, DINO for subject). "
        "Works with every method; slower (a decode and two encoders with gradients per guided step)."
    ),
    "guidance_style": "Weight of CLIP image similarity to the style references (0 = off, max 10).",
    "guidance_subject": "Weight of DINO similarity to the subject references (0 = off, max 10).",
    "guidance_subject_clip": "Weight of CLIP image similarity to the subject references (default off).",
    "guidance_text": "Weight of CLIP similarity to the prompt (default off; needs no reference image).",
    "guidance_eta": "Size of each nudge, in units of the latent's RMS, scaled down with the noise (>0-1).",
    "guidance_start": "First guided point of each pass, as a fraction of its steps (0-1).",
    "guidance_end": "Guidance stops at this fraction of each pass's steps (0-1; late nudges add artefacts).",
    "guidance_every": "Guide every k-th step inside the window (1 = every step; 1-1000).",
    "guidance_iters": "Gradient steps per guided step (1-10).",
    "guidance_decoder": "taesd: the tiny decoder (fast). vae: the checkpoint's full VAE (slow, more memory).",
    "clip_model": "open_clip model and weights as MODEL:PRETRAINED, e.g. ViT-B-32:laion2b_s34b_b79k.",
    "dino_model": "timm DINO model, e.g. vit_small_patch16_224.dino.",
    "style_refs": "Images of the style (API: a list of base64 strings). Not stored in the infotext.",
    "subject_refs": "Images of the subject (API: a list of base64 strings). Not stored in the infotext.",
}

NAME_FIELDS = ("subject", "style")
REFERENCE_FIELDS = ("style_refs", "subject_refs")
OPTIONAL_FIELDS = frozenset({"beta", "hires_method", "hires_pattern", "hires_alpha", "hires_beta"})

INFOTEXT_NAMES_KEY = "K-LoRA"
INFOTEXT_KEYS: dict[str, str] = {
    "strengths": "K-LoRA strengths",
    "method": "K-LoRA method",
    "pattern": "K-LoRA pattern",
    "alpha": "K-LoRA alpha",
    "beta": "K-LoRA beta",
    "gamma": "K-LoRA gamma",
    "seed": "K-LoRA seed",
    "te_policy": "K-LoRA TE",
    "hires": "K-LoRA hires",
    "hires_method": "K-LoRA hires method",
    "hires_pattern": "K-LoRA hires pattern",
    "hires_alpha": "K-LoRA hires alpha",
    "hires_beta": "K-LoRA hires beta",
    "show_map": "K-LoRA map",
    "kl_temperature": "K-LoRA KL temperature",
    "kl_direction": "K-LoRA KL direction",
    "kl_per_sample": "K-LoRA KL per image",
    "kl_hybrid": "K-LoRA KL hybrid",
    "guidance": "K-LoRA guidance",
    "guidance_style": "K-LoRA guidance style",
    "guidance_subject": "K-LoRA guidance subject",
    "guidance_subject_clip": "K-LoRA guidance subject CLIP",
    "guidance_text": "K-LoRA guidance text",
    "guidance_eta": "K-LoRA guidance eta",
    "guidance_start": "K-LoRA guidance start",
    "guidance_end": "K-LoRA guidance end",
    "guidance_every": "K-LoRA guidance every",
    "guidance_iters": "K-LoRA guidance iters",
    "guidance_decoder": "K-LoRA guidance decoder",
    "clip_model": "K-LoRA CLIP",
    "dino_model": "K-LoRA DINO",
}
