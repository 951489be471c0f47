"""Wall time of a K-LoRA generation against the same two LoRAs stacked with <lora> tags and one LoRA.

Runs against a live WebUI (A1111, Forge or reForge: it only uses the HTTP API; run it once per host), for
an SD1.5 and/or an SDXL checkpoint. Per model and round, each variant (klora, stacked, single) runs
`--repeat-each` times in a row: the first job after a change of variant pays the host's re-merge of LoRA
weights (Forge: several seconds) and is reported apart; the later ones are the repeated jobs a user
generating with one setting sees, and their medians give the ratios. Variants alternate, so machine noise
hits all three alike.

SDXL on a CPU needs the WebUI started with `--precision half` (about 15 GB; `--no-half` about twice that).

    python bench/webui_overhead.py --url http://127.0.0.1:7860 \\
        --sd15 CHECKPOINT --sd15-loras SUBJECT,STYLE --sdxl CHECKPOINT --sdxl-loras SUBJECT,STYLE \\
        [--steps 20] [--size 64] [--sdxl-size 64] [--rounds 3] [--repeat-each 3]

Ends with `RESULT host=<host> klora_vs_stacked=<SD1.5, repeated> klora_vs_single=…
sdxl_klora_vs_stacked=<SDXL, repeated> sdxl_klora_vs_single=… (and the first-job ratios, *_first)`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from dataclasses import dataclass, field

VARIANTS = ("klora", "stacked", "single")


def call(url: str, path: str, payload: dict | None, timeout: float) -> dict:
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=None if payload is None else json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if payload is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status} from {path}")
    return json.loads(body or b"null") or {}


def generate(url: str, payload: dict, timeout: float) -> float:
    start = time.perf_counter()
    call(url, "/sdapi/v1/txt2img", payload, timeout)
    return time.perf_counter() - start


@dataclass
class Model:
    """One checkpoint to measure, its two LoRAs and image size; `prefix` names its RESULT keys."""

    prefix: str
    checkpoint: str
    subject: str
    style: str
    size: int
    first: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    repeated: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})

    def payloads(self, steps: int) -> dict[str, dict]:
        base = {
            "prompt": "a photo of a dog",
            "steps": steps,
            "width": self.size,
            "height": self.size,
            "seed": 42,
            "sampler_name": "Euler",
            "cfg_scale": 5,
        }
        klora = {"enabled": True, "subject": self.subject, "style": self.style}
        return {
            "klora": {**base, "alwayson_scripts": {"K-LoRA": {"args": [klora]}}},
            "stacked": {**base, "prompt": base["prompt"] + f" <lora:{self.subject}:1> <lora:{self.style}:1>"},
            "single": {**base, "prompt": base["prompt"] + f" <lora:{self.subject}:1>"},
        }

    def ratios(self) -> dict[str, float]:
        repeated = {v: statistics.median(t) for v, t in self.repeated.items()}
        first = {v: statistics.median(t) for v, t in self.first.items()}
        return {
            f"{self.prefix}klora_vs_stacked": repeated["klora"] / repeated["stacked"],
            f"{self.prefix}klora_vs_single": repeated["klora"] / repeated["single"],
            f"{self.prefix}klora_vs_stacked_first": first["klora"] / first["stacked"],
        }


def load_checkpoint(url: str, checkpoint: str, timeout: float) -> None:
    """Switch the WebUI's model (the same setting the checkpoint dropdown writes); returns once loaded.

    Not when it is already the chosen one: A1111 v1.10.1 loads its start-up model in a thread after the API
    is up, and setting the option meanwhile starts a second load beside it, whose model comes out broken
    (tensors left on the meta device)."""
    current = str(call(url, "/sdapi/v1/options", None, timeout).get("sd_model_checkpoint") or "")
    if current == checkpoint or current.partition(" [")[0] == checkpoint:
        return
    call(url, "/sdapi/v1/options", {"sd_model_checkpoint": checkpoint}, timeout)


def measure(url: str, model: Model, steps: int, rounds: int, repeat_each: int, timeout: float) -> None:
    load_checkpoint(url, model.checkpoint, timeout)
    payloads = model.payloads(steps)
    for payload in payloads.values():  # warm-up: load the LoRAs, compute and cache the scores
        generate(url, payload, timeout)
    for round_index in range(rounds):
        for name, payload in payloads.items():
            model.first[name].append(generate(url, payload, timeout))
            for _ in range(max(1, repeat_each - 1)):
                model.repeated[name].append(generate(url, payload, timeout))
        print(
            f"{model.checkpoint} round {round_index + 1}: "
            + "  ".join(
                f"{n} first {model.first[n][-1]:.2f}s repeated {model.repeated[n][-1]:.2f}s" for n in VARIANTS
            )
        )
    medians = {n: (statistics.median(model.first[n]), statistics.median(model.repeated[n])) for n in VARIANTS}
    print(
        f"{model.checkpoint} medians: "
        + "  ".join(f"{n} first {f:.2f}s repeated {r:.2f}s" for n, (f, r) in medians.items())
    )


def pair(value: str) -> tuple[str, str]:
    subject, sep, style = value.partition(",")
    if not sep or not subject or not style:
        raise argparse.ArgumentTypeError("expected SUBJECT,STYLE")
    return subject, style


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--sd15", help="SD1.5 checkpoint title as the WebUI lists it")
    parser.add_argument("--sd15-loras", type=pair, help="SUBJECT,STYLE LoRA names for the SD1.5 checkpoint")
    parser.add_argument("--sdxl", help="SDXL checkpoint title as the WebUI lists it")
    parser.add_argument("--sdxl-loras", type=pair, help="SUBJECT,STYLE LoRA names for the SDXL checkpoint")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="SD1.5 image side in px")
    parser.add_argument("--sdxl-size", type=int, default=64, help="SDXL image side in px")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat-each", type=int, default=3, help="jobs per variant in a row (≥ 2)")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()

    models = []
    for prefix, option, checkpoint, loras, size in (
        ("", "--sd15-loras", args.sd15, args.sd15_loras, args.size),
        ("sdxl_", "--sdxl-loras", args.sdxl, args.sdxl_loras, args.sdxl_size),
    ):
        if checkpoint:
            if loras is None:
                parser.error(f"{option} is required with that checkpoint")
            models.append(Model(prefix, checkpoint, loras[0], loras[1], size))
    if not models:
        parser.error("give --sd15 and/or --sdxl")
    host = call(args.url, "/klora/v1/version", None, args.timeout).get("host", "unknown")
    results: dict[str, float] = {}
    for model in models:
        measure(args.url, model, args.steps, args.rounds, max(2, args.repeat_each), args.timeout)
        results.update(model.ratios())
    print(f"RESULT host={host} " + " ".join(f"{k}={v:.4f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
