"""Bit-packed quantization: round-trip error bounds per bit width, packing, bytes, re-quantization."""

import pytest
import torch

from metakv_cl.kv import KVStorage, quantize


def sample(shape=(2, 3, 64, 32), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    x[..., 5] *= 20.0  # an outlier channel, as keys have
    return x


def group_step(x: torch.Tensor, bits: int, axis: str, group: int) -> torch.Tensor:
    """Each element's quantization step (max - min) / (2^bits - 1) of its group, broadcast to x."""
    *lead, tokens, dim = x.shape
    if axis == "token":
        grouped = x.reshape(*lead, tokens, dim // group, group)
        span = grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)
    else:
        grouped = x.reshape(*lead, tokens // group, group, dim)
        span = grouped.amax(-2, keepdim=True) - grouped.amin(-2, keepdim=True)
    return (span / (2**bits - 1)).expand_as(grouped).reshape(x.shape)


@pytest.mark.parametrize("axis,group", [("token", 32), ("token", 8), ("channel", 16), ("channel", 64)])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_is_at_most_half_a_step(bits, axis, group):
    x = sample()
    restored = quantize(x, bits, axis=axis, group_size=group).dequantize()
    error = (restored - x).abs()
    step = group_step(x, bits, axis, group)
    assert torch.all(error <= 0.5 * step * (1 + 1e-4) + 1e-6)
    # The bound is met with room, not by accident: the mean error is about a quarter step.
    assert 0.15 < float((error / step).mean()) < 0.35


@pytest.mark.parametrize("bits,worst", [(8, 0.012), (4, 0.2), (2, 1.0)])
def test_error_shrinks_with_bits(bits, worst):
    x = torch.randn(1, 1, 256, 64, generator=torch.Generator().manual_seed(1))
    relative = (quantize(x, bits).dequantize() - x).norm() / x.norm()
    assert float(relative) < worst


def test_per_channel_groups_spare_normal_channels_from_an_outlier_channel():
    x = sample()  # channel 5 is an outlier
    normal = [c for c in range(x.shape[-1]) if c != 5]
    per_channel = (quantize(x, 4, axis="channel", group_size=32).dequantize() - x)[..., normal].norm()
    per_token = (quantize(x, 4, axis="token").dequantize() - x)[..., normal].norm()
    assert per_channel < 0.2 * per_token


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_bytes_are_the_packed_codes_plus_scales(bits):
    x = sample()
    q = quantize(x, bits, axis="token", group_size=32)
    assert q.packed.dtype == torch.uint8
    assert q.packed.numel() == x.numel() * bits // 8
    assert q.nbytes == q.packed.nbytes + q.scale.nbytes + q.zero.nbytes
    assert q.scale.numel() == x.numel() // 32


def test_constant_groups_round_trip_exactly():
    x = torch.full((1, 2, 8, 16), 3.25)
    assert torch.equal(quantize(x, 2).dequantize(), x)


def test_requantizing_and_promoting_are_lossless():
    x = sample()
    two = quantize(x, 2, axis="token", group_size=16).dequantize()
    assert torch.allclose(quantize(two, 2, axis="token", group_size=16).dequantize(), two, atol=1e-5)
    for bits in (4, 8):  # the 2-bit grid is part of the 4- and 8-bit grids
        assert torch.allclose(quantize(two, bits, axis="token", group_size=16).dequantize(), two, atol=1e-5)


def test_storage_mixes_segments_and_counts_every_byte():
    x = sample()
    storage = KVStorage([quantize(x[..., :32, :], 4, axis="channel", group_size=32), x[..., 32:, :], x[..., :3, :]])
    assert storage.seq_len == 67 and storage.is_quantized
    assert storage.nbytes == sum(t.nbytes for t in storage.tensors())
    assert torch.allclose(storage.to_float()[..., 32:64, :], x[..., 32:, :])


def test_bad_arguments_are_rejected():
    x = sample()
    with pytest.raises(ValueError, match="unsupported bit width"):
        quantize(x, 3)
    with pytest.raises(ValueError, match="must divide"):
        quantize(x, 4, axis="channel", group_size=7)
    with pytest.raises(ValueError, match="unknown quantization axis"):
        quantize(x, 4, axis="head")
