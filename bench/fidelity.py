"""Fidelity benchmark of the trained toy world: subject, style and *both* accuracy per fusion method.

    python bench/fidelity.py [--seeds 64] [--steps 25] [--cfg 4] [--out fidelity-out] [--threads 2]

Same as `python -m lib_klora world bench`. For each of the 3 × 3 subject × style pairs of the world, the
prompt `a <subject> in <style> style` is sampled for the same fixed seeds with every method (base, each LoRA
alone, stacked, K-LoRA s and s*, the fixed and random baselines, dynamic, dynamic hybrid, reference
guidance), and the world's judges name the object and the style of every image. Prints a Markdown table
(the paper's Table 1, judged), writes one PNG sheet per pair (rows methods, columns seeds) and a JSON file,
and ends with one line

    RESULT world_valid=<f> both_klora=<f> both_stacked=<f> both_dynamic=<f> both_guided=<f>
           klora_vs_stacked=<f>   (one line)

where world_valid is the lowest world-validity figure recorded in the weights' manifest (measured by
`python -m lib_klora.tools.world.validity`). Seeds are fixed: the same command gives the same numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib_klora.tools.world.bench_command import main

if __name__ == "__main__":
    raise SystemExit(main())
