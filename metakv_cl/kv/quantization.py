"""Integer KV storage: bit-packed asymmetric quantization and mixed-precision segments.

A cache layer holds its keys and values as :class:`KVStorage`: a list of segments along the
token axis, each either a plain float tensor or a :class:`QuantizedTensor`. Every segment
reports the bytes it really holds (packed integers plus scales and zero points), so a cache's
reported size is the size of its tensors, not an estimate.

Quantization is asymmetric min-max over groups:

* ``axis="token"``: each token's channels are split into groups of ``group_size`` channels,
  each with its own scale and zero point (KIVI's per-token value quantization; also used for
  keys by the attention-guided mixed-precision method, where tokens change precision).
* ``axis="channel"``: each channel is quantized over groups of ``group_size`` consecutive
  tokens (KIVI's per-channel key quantization: key outliers live in fixed channels).

The dequantized grid contains each group's minimum and maximum, so quantizing a dequantized
tensor again with the same grouping reproduces it (up to float rounding). Because
``2**b - 1`` divides ``2**(2b) - 1``, re-quantizing a 2-bit group at 4 or 8 bits is lossless too:
compaction methods can re-quantize stored tokens from their dequantized values without
compounding errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch

SUPPORTED_BITS = (2, 4, 8)
QuantAxis = Literal["token", "channel"]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; choose one of {SUPPORTED_BITS}")


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim into uint8 (8 // bits codes a byte)."""
    per_byte = 8 // bits
    if codes.shape[-1] % per_byte:
        raise ValueError(f"last dimension {codes.shape[-1]} is not a multiple of {per_byte} (needed to pack {bits}-bit codes)")
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


@dataclass
class QuantizedTensor:
    """A [batch, heads, tokens, dim] tensor stored as bit-packed integers with group scales.

    Attributes:
        packed: uint8 codes, ``8 // bits`` per byte along the last dimension.
        scale: per-group step size (the original dtype).
        zero: per-group minimum (the original dtype).
        bits: 2, 4 or 8.
        axis: ``"token"`` (groups of channels within a token) or ``"channel"`` (groups of tokens
            within a channel).
        group_size: channels (token axis) or tokens (channel axis) per group.
        shape: the original shape.
        dtype: the original dtype.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    axis: QuantAxis
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes plus scales and zero points."""
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes

    @property
    def seq_len(self) -> int:
        return self.shape[-2]

    def _grouped_shape(self) -> tuple[int, ...]:
        *lead, tokens, dim = self.shape
        if self.axis == "token":
            return (*lead, tokens, dim // self.group_size, self.group_size)
        return (*lead, tokens // self.group_size, self.group_size, dim)

    def dequantize(self) -> torch.Tensor:
        """The float tensor this stores (the original shape and dtype)."""
        codes = _unpack(self.packed, self.bits).reshape(self._grouped_shape())
        return (codes.to(self.scale.dtype) * self.scale + self.zero).reshape(self.shape).to(self.dtype)

    def map_batch(self, fn) -> QuantizedTensor:
        """Apply a batch-dimension operation (select, repeat) to every stored tensor."""
        packed, scale, zero = fn(self.packed), fn(self.scale), fn(self.zero)
        return QuantizedTensor(packed, scale, zero, self.bits, self.axis, self.group_size,
                               torch.Size((packed.shape[0], *self.shape[1:])), self.dtype)


def quantize(x: torch.Tensor, bits: int, *, axis: QuantAxis = "token", group_size: int | None = None) -> QuantizedTensor:
    """Asymmetric min-max quantization of a [..., tokens, dim] tensor.

    Args:
        x: the float tensor.
        bits: 2, 4 or 8.
        axis: ``"token"`` (scales per token and channel group) or ``"channel"`` (scales per
            channel and token group).
        group_size: channels per group (token axis; default all channels) or tokens per group
            (channel axis; default all tokens). Must divide that dimension.

    Returns:
        The :class:`QuantizedTensor`. Each element's round-trip error is at most half its
        group's step ``(max - min) / (2**bits - 1)``.

    Raises:
        ValueError: unsupported bits or axis, or a group size that does not divide the axis.
    """
    _check_bits(bits)
    if x.dim() < 2:
        raise ValueError(f"quantize expects a [..., tokens, dim] tensor, got shape {tuple(x.shape)}")
    *lead, tokens, dim = x.shape
    if axis == "token":
        size = dim if group_size is None else group_size
        if size <= 0 or dim % size:
            raise ValueError(f"group_size {size} must divide the channel dimension {dim}")
        grouped = x.reshape(*lead, tokens, dim // size, size)
        reduce_dim = -1
    elif axis == "channel":
        size = tokens if group_size is None else group_size
        if size <= 0 or tokens % size:
            raise ValueError(f"group_size {size} must divide the token count {tokens}")
        grouped = x.reshape(*lead, tokens // size, size, dim)
        reduce_dim = -2
    else:
        raise ValueError(f"unknown quantization axis {axis!r}; choose 'token' or 'channel'")
    levels = (1 << bits) - 1
    low = grouped.amin(dim=reduce_dim, keepdim=True)
    high = grouped.amax(dim=reduce_dim, keepdim=True)
    scale = (high - low) / levels
    # A constant group has no spread: any positive step gives code 0 and dequantizes to `low`.
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((grouped - low) / safe_scale).clamp_(0, levels)
    return QuantizedTensor(
        packed=_pack(codes.reshape(x.shape), bits),
        scale=safe_scale.where(scale > 0, torch.zeros_like(scale)),
        zero=low,
        bits=bits,
        axis=axis,
        group_size=size,
        shape=x.shape,
        dtype=x.dtype,
    )


Segment = Union[torch.Tensor, QuantizedTensor]


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if it owns its whole storage, else a compact copy (a slice keeps its base alive)."""
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


def segment_to_float(segment: Segment) -> torch.Tensor:
    """A segment as a float tensor (dequantized if it is quantized)."""
    return segment.dequantize() if isinstance(segment, QuantizedTensor) else segment


class KVStorage:
    """Keys or values of one cache layer: segments along the token axis (dim -2).

    A compaction method returns one (or a tensor, wrapped into one); a cache layer keeps the
    part up to its last quantized segment (:class:`~metakv_cl.kv.cache.CompactedLayer`).
    ``to_float()`` materializes the whole tensor; for a single float segment that is the stored
    tensor itself, with no copy.
    """

    def __init__(self, segments: list[Segment] | None = None):
        # Float slices are copied out of their base tensors, so that the bytes held are the bytes counted.
        self.segments: list[Segment] = [
            owned(s) if isinstance(s, torch.Tensor) else s for s in (segments or []) if s.shape[-2] > 0
        ]

    @classmethod
    def wrap(cls, stored: Segment | KVStorage) -> KVStorage:
        """A storage from what a compaction method returned (a tensor, quantized tensor or storage)."""
        if isinstance(stored, KVStorage):
            return stored
        return cls([stored])

    @property
    def seq_len(self) -> int:
        return sum(segment.shape[-2] for segment in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(segment.nbytes for segment in self.segments)

    @property
    def is_quantized(self) -> bool:
        return any(isinstance(segment, QuantizedTensor) for segment in self.segments)

    def to_float(self) -> torch.Tensor:
        """The whole [batch, heads, tokens, dim] tensor in float (the stored tensor itself when all-float)."""
        parts = [segment_to_float(segment) for segment in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension operation (index_select, repeat_interleave) to every segment."""
        self.segments = [s.map_batch(fn) if isinstance(s, QuantizedTensor) else fn(s) for s in self.segments]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (for byte accounting and tests)."""
        held: list[torch.Tensor] = []
        for segment in self.segments:
            held.extend([segment.packed, segment.scale, segment.zero] if isinstance(segment, QuantizedTensor) else [segment])
        return held
