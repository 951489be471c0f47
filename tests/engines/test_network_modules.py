"""A1111 NetworkModule views: the activation branch of a plain LoRA layer and the dtype it computes in."""

from __future__ import annotations

import types

import torch
from torch import nn

from lib_klora.dynamic.branches import branch_dtype
from lib_klora.engines.network_modules import branch_for


def plain_module(generator: torch.Generator) -> types.SimpleNamespace:
    """The attributes A1111's `network_lora.NetworkModuleLora` gives a rank-2 LoRA on an 8 → 16 linear."""
    up, down = nn.Linear(2, 16, bias=False), nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(torch.randn(16, 2, generator=generator))
        down.weight.copy_(torch.randn(2, 8, generator=generator))
    return types.SimpleNamespace(
        sd_key="proj",
        up_model=up,
        down_model=down,
        dim=2,
        network=types.SimpleNamespace(dyn_dim=None),
        calc_scale=lambda: 0.5,
    )


def test_a_half_precision_layer_on_the_cpu_gets_an_fp32_branch_answering_in_half() -> None:
    generator = torch.Generator().manual_seed(0)
    module, layer = plain_module(generator), nn.Linear(8, 16).half()
    branch = branch_for(module, layer, 0.8)
    assert branch.dtype == torch.float32  # CPU half kernels are slow for the skinny matmuls
    x = torch.randn(3, 8, generator=generator).half()
    out = branch.delta(x)
    want = x.float() @ module.down_model.weight.T @ module.up_model.weight.T * 0.4
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), want, rtol=2e-3, atol=2e-3)
    assert branch_for(module, layer.to("meta"), 0.8).dtype == torch.float16  # on an accelerator: half


def test_branch_dtype() -> None:
    for dtype, on_cpu, elsewhere in (
        (torch.float16, torch.float32, torch.float16),
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float32, torch.float32, torch.float32),
        (torch.float8_e4m3fn, torch.float32, torch.float32),
    ):
        assert branch_dtype(torch.zeros(2, dtype=dtype)) == on_cpu
        assert branch_dtype(torch.zeros(2, dtype=dtype, device="meta")) == elsewhere
