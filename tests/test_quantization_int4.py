"""The online W4A16 int4 quantizer: weights round to the nearest of their group's 16 levels, and weights already
on such levels (as a GGUF Q4_1 model's are) come back unchanged."""
from __future__ import annotations

import pytest
import torch

from kvserve.core.quantization import dequantize
from kvserve.core.quantization.int4 import quantize_weight


@pytest.mark.parametrize("group_size", [32, 128])
def test_weights_round_to_the_nearest_step_of_their_group(group_size):
    torch.manual_seed(group_size)
    weight = torch.randn(24, 200) * torch.linspace(0.01, 3, 24)[:, None]   # 200 inputs: a shorter last group
    quantized = quantize_weight(weight, group_size)
    qweight, scale, offset = (quantized.tensors[name] for name in ("qweight", "scale", "offset"))
    groups = -(-200 // group_size)
    assert quantized.scheme == "w4a16_int4" and quantized.shape == (24, 200) and quantized.group_size == group_size
    assert qweight.dtype == torch.uint8 and scale.shape == offset.shape == (24, groups)
    step = scale.repeat_interleave(group_size, dim=1)[:, :200]
    assert ((dequantize(quantized, torch.float32) - weight).abs() <= step / 2 + 1e-6).all()
    # Each group spans its own range: its smallest weight is level 0 and its largest level 15.
    for g in range(groups):
        levels = qweight[:, g * group_size:(g + 1) * group_size]
        assert levels.amin(dim=1).tolist() == [0] * 24 and levels.amax(dim=1).tolist() == [15] * 24


def test_sixteen_level_groups_are_kept_exactly():
    # Weights that already sit on 16 levels of their group, with a float16 scale and offset (as a GGUF Q4_1
    # model's do), come back unchanged.
    torch.manual_seed(0)
    levels, scale, low = torch.randint(0, 16, (8, 64)), (torch.rand(8, 2) + 0.1).half(), torch.randn(8, 2).half()
    scale, low = scale.float(), low.float()
    levels[:, 0], levels[:, 32], levels[:, 1], levels[:, 33] = 0, 0, 15, 15
    weight = levels * scale.repeat_interleave(32, dim=1) + low.repeat_interleave(32, dim=1)
    assert torch.allclose(dequantize(quantize_weight(weight, 32), torch.float32), weight, atol=1e-6)


def test_weights_beyond_float16s_range_are_a_clear_error():
    weight = torch.randn(4, 32)
    weight[2, 5] = 40000.0   # a group's range, 40000 - min, would overflow float16's 65504
    with pytest.raises(ValueError, match="float16.*40000.*32752"):
        quantize_weight(weight)
