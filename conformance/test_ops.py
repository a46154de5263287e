"""The platform's fused ops (platform_ops) against the torch references they replace."""
from __future__ import annotations

import pytest
import torch

from kvserve.conformance import ops as checks
from kvserve.core.layers.ops import REFERENCE_OPS


def check_rotary(ops: dict, dtype: torch.dtype, device: torch.device) -> None:
    for head_size, rotary_dim in ((64, 64), (24, 16)):   # whole heads, and a partial rotary dimension
        checks.check_rotary_on_strided_views(ops, dtype, device, head_size, rotary_dim)


def check_argmax(ops: dict, dtype: torch.dtype, device: torch.device) -> None:
    if dtype != torch.float32:
        pytest.skip("argmax takes the sampler's float32 logits")
    checks.check_argmax(ops, device)


CHECKS = {
    "rms_norm": checks.check_rms_norm,
    "add_rms_norm": checks.check_add_rms_norm,
    "silu_and_mul": checks.check_silu_and_mul,
    "gelu_tanh_and_mul": checks.check_gelu_tanh_and_mul,
    "rotary_embedding": check_rotary,
    "argmax": check_argmax,
    "fused_moe": checks.check_fused_moe,
}


def test_every_op_name_is_known(platform):
    unknown = set(platform.ops()) - set(REFERENCE_OPS)
    assert not unknown, f"platform_ops returns unknown names {sorted(unknown)}; allowed: {sorted(REFERENCE_OPS)}"


@pytest.mark.parametrize("name", sorted(REFERENCE_OPS))
def test_fused_op_matches_the_reference(platform, dtype, name):
    ops = platform.ops()
    if name not in ops:
        pytest.skip(f"platform {platform.name!r} keeps the torch reference of {name}")
    CHECKS[name](ops, dtype, platform.device)
