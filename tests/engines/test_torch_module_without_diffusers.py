"""The generic engine and the diffusers front door import and run without diffusers or transformers.

No importorskip here: in the CI venv with AUTOMATIC1111's pins (no diffusers) this is the real case.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from lib_klora.tools.synthetic import write_lora


def test_runs_without_diffusers_installed(tmp_path):
    """`import lib_klora` and the engine need neither diffusers nor transformers."""
    subject, style = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path, seed in ((subject, 1), (style, 2)):
        gen = torch.Generator().manual_seed(seed)
        write_lora(
            path,
            {
                "lora_unet_proj_in.lora_down.weight": torch.randn(2, 6, generator=gen),
                "lora_unet_proj_in.lora_up.weight": torch.randn(6, 2, generator=gen),
            },
        )
    script = f"""
import sys
sys.modules["diffusers"] = None
sys.modules["transformers"] = None
import torch
import lib_klora
from lib_klora.engines.torch_module import ModuleFusion
import lib_klora.diffusers
net = torch.nn.Module()
net.proj_in = torch.nn.Linear(6, 6)
x = torch.randn(1, 6)
base = net.proj_in(x)
with ModuleFusion({{"unet": net}}, {str(subject)!r}, {str(style)!r}) as fusion:
    fusion.step_callback(0, 10)
    assert not torch.equal(net.proj_in(x), base)
assert torch.equal(net.proj_in(x), base)
print("ok", [name for name in sys.modules if name.startswith(("diffusers", "transformers"))])
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok ['diffusers', 'transformers']"
