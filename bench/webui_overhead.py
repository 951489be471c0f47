"""Wall time of a K-LoRA generation against the same two LoRAs stacked with <lora> tags and one LoRA.

Runs are interleaved (klora, stacked, single, klora, ...) against a live WebUI so machine noise hits all
three alike; the medians are compared. Each variant runs `--repeat-each` times in a row and only the last
run counts: switching the set of <lora> tags makes the WebUI re-merge LoRA weights (Forge: several seconds),
a cost a user generating with one setting pays once, not per image.

Works against any of the hosts (A1111, Forge, reForge): it only uses the HTTP API.

    python bench/webui_overhead.py --url http://127.0.0.1:7860 --subject subj --style style [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request


def generate(url: str, payload: dict, timeout: float) -> float:
    request = urllib.request.Request(
        url.rstrip("/") + "/sdapi/v1/txt2img",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--subject", default="subj")
    parser.add_argument("--style", default="style")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--repeat-each", type=int, default=2, help="runs per variant in a row; the last counts"
    )
    args = parser.parse_args()

    base = {
        "prompt": "a photo of a dog",
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "seed": 42,
        "sampler_name": "Euler",
        "cfg_scale": 5,
    }
    variants = {
        "klora": {
            **base,
            "alwayson_scripts": {
                "K-LoRA": {"args": [{"enabled": True, "subject": args.subject, "style": args.style}]}
            },
        },
        "stacked": {**base, "prompt": base["prompt"] + f" <lora:{args.subject}:1> <lora:{args.style}:1>"},
        "single": {**base, "prompt": base["prompt"] + f" <lora:{args.subject}:1>"},
    }
    for payload in variants.values():  # warm-up: load LoRAs, compute and cache scores
        generate(args.url, payload, args.timeout)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, payload in variants.items():
            for _ in range(max(0, args.repeat_each - 1)):
                generate(args.url, payload, args.timeout)
            times[name].append(generate(args.url, payload, args.timeout))
        print(f"round {round_index + 1}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    median = {name: statistics.median(values) for name, values in times.items()}
    print("medians: " + "  ".join(f"{n} {m:.2f}s" for n, m in median.items()))
    print(
        f"RESULT klora_vs_stacked={median['klora'] / median['stacked']:.4f} "
        f"klora_vs_single={median['klora'] / median['single']:.4f}"
    )


if __name__ == "__main__":
    main()
