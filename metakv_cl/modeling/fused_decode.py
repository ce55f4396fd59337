"""Meta-KV's work for one decoded token as one Triton kernel.

Cached one-token decoding is launch-bound: per layer the torch path of :class:`MetaKVLayer`
issues about fifteen tiny kernels (source projection, running-state update, ``x A``, core
generator, core, ``@ B``, scale, the add into K and V). :class:`FusedDecodeStep` does the same
work in one launch: it reads x once, updates the dynamic source's running state in place (fixed
addresses, so a CUDA graph can replay it) and adds ``delta = alpha * [u_K' B_K | u_V' B_V]`` into
the K/V projection outputs (or writes it out).

Work split and the race. Most of the bytes are the projection weights ``[source | A]`` (d x
(s + 2r)); the core generator and B are a few KB. So each batch row gets ``splits`` programs
that each project a slice of the hidden dimension and store their partial sums to a scratch
buffer. The program that arrives LAST at the row's counter (an acq_rel atomic, after a
block barrier, so every partial store of the row is visible to it) sums the partials in a
fixed order (deterministic), reads the old running state, writes the new one and the delta,
and resets the counter to zero for the next launch. Only that one program touches the state
or the delta, so no program can read a state that another already overwrote. The pattern
(last-arriving block finishes) never waits on another program, so it cannot deadlock however
the programs are scheduled. With ``splits == 1`` the atomic and the scratch are compiled out.

Latency. At batch 1 the kernel is a chain of memory round trips, not of bandwidth or FLOPs. So
the finishing program issues every load it needs (state, core generator, B, the outputs it adds
into) at once, before the partial sums, and waits on memory three times in all: projection,
arrival, finishing loads (``benchmarks/results/perf.md``, change 5).

Numerics follow the torch path: the source runs in float32 on exactly upcast weights, and the
kernel rounds to the model dtype where the torch path does (C, C + M, ``x A``, the generated
core, ``u'``, delta), so float32 agrees to float32 rounding and bfloat16 to about one ulp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn

from metakv_cl.modeling.modulation import TARGETS, FactorizedModulation
from metakv_cl.modeling.sources import AttentivePoolingSource, MaxSource, MeanSource

# The dynamic source, as the kernel's SOURCE constant (constexpr globals, so kernels can read them).
NO_SOURCE, MEAN, ATTENTIVE, MAX = (tl.constexpr(kind) for kind in range(4))
SOURCE_KINDS = {MeanSource: MEAN.value, AttentivePoolingSource: ATTENTIVE.value, MaxSource: MAX.value}
STATE_TENSORS = {MeanSource: 2, AttentivePoolingSource: 2, MaxSource: 1}  # (sum, total) or (running max,)
# Elements per register tile: 64 float32 values a thread at 4 warps (the finishing tiles also set the warps).
TILE_ELEMENTS = 8192
MAX_BLOCK_D = 64


@triton.jit
def _round(value, dtype):
    """``value`` rounded to ``dtype`` and back to float32 (where the torch path stores in dtype)."""
    return value.to(dtype).to(tl.float32)


@triton.jit
def _project(acc, x_chunk, offs_d, mask_d, projection_ptr, first_col, COLS: tl.constexpr,
             PACKED_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """``acc + x_chunk @ projection[offs_d, first_col : first_col + COLS]`` in float32."""
    offs_c = tl.arange(0, BLOCK_COLS)
    mask = mask_d[:, None] & (offs_c < COLS)[None, :]
    weight = tl.load(projection_ptr + offs_d[:, None] * PACKED_COLS + first_col + offs_c[None, :], mask=mask, other=0.0)
    return acc + tl.sum(x_chunk[:, None] * weight.to(tl.float32), axis=0)


@triton.jit
def _store_partial(row_partials_ptr, split, acc, first_col, COLS: tl.constexpr, PACKED_COLS: tl.constexpr,
                   BLOCK_COLS: tl.constexpr):
    """Store one program's partial projection of columns ``first_col ..`` at its split's slot."""
    offs_c = tl.arange(0, BLOCK_COLS)
    tl.store(row_partials_ptr + split * PACKED_COLS + first_col + offs_c, acc, mask=offs_c < COLS)


@triton.jit
def _sum_partials(row_partials_ptr, first_col, COLS: tl.constexpr, PACKED_COLS: tl.constexpr,
                  SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """The full projection of columns ``first_col ..``: every split's partial, summed in split order.

    Loaded with ``.cg`` (from L2, past this SM's L1): other programs wrote them during this launch.
    """
    offs_split = tl.arange(0, BLOCK_SPLITS)
    offs_c = tl.arange(0, BLOCK_COLS)
    mask = (offs_split < SPLITS)[:, None] & (offs_c < COLS)[None, :]
    partials = tl.load(row_partials_ptr + offs_split[:, None] * PACKED_COLS + first_col + offs_c[None, :],
                       mask=mask, other=0.0, cache_modifier=".cg")
    return tl.sum(partials, axis=0)


@triton.jit
def _pick(vector, offs, index):
    """``vector[index]`` for a block of indices, from a register vector whose lane indices are ``offs``."""
    return tl.sum(tl.where(offs[None, :] == index[:, None], vector[None, :], 0.0), axis=1)


@triton.jit
def _load_core_block(core_weight_ptr, core_bias_ptr, target, i0, MATRIX_CORE: tl.constexpr, STATE_DIM: tl.constexpr,
                     RANK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """Core-generator rows of one target, in the weights' dtype: (weight, bias).

    Matrix core: the rows of G's rows i0 .. i0 + BLOCK_I, weight [BLOCK_I, BLOCK_R, BLOCK_S] and bias
    [BLOCK_I, BLOCK_R] (generator row ``target * rank^2 + i * rank + j``). Gate core: all of g,
    weight [BLOCK_R, BLOCK_S] and bias [BLOCK_R] (row ``target * rank + j``).
    """
    offs_r = tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, BLOCK_S)
    mask_r = offs_r < RANK
    mask_s = offs_s < STATE_DIM
    if MATRIX_CORE:
        offs_i = i0 + tl.arange(0, BLOCK_I)
        rows = target * RANK * RANK + offs_i[:, None] * RANK + offs_r[None, :]
        mask = (offs_i < RANK)[:, None] & mask_r[None, :]
        weight = tl.load(core_weight_ptr + rows[:, :, None] * STATE_DIM + offs_s[None, None, :],
                         mask=mask[:, :, None] & mask_s[None, None, :], other=0.0)
        bias = tl.load(core_bias_ptr + rows, mask=mask, other=0.0)
    else:
        rows = target * RANK + offs_r
        weight = tl.load(core_weight_ptr + rows[:, None] * STATE_DIM + offs_s[None, :],
                         mask=mask_r[:, None] & mask_s[None, :], other=0.0)
        bias = tl.load(core_bias_ptr + rows, mask=mask_r, other=0.0)
    return weight, bias


@triton.jit
def _load_output_tile(output_factor_ptr, out_ptr, out_row_stride, row, target, j0, ACCUMULATE: tl.constexpr,
                      RANK: tl.constexpr, KV_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KV: tl.constexpr):
    """Output columns j0 .. j0 + BLOCK_KV of one target: the rows of ``(alpha B)[target]``
    [BLOCK_R, BLOCK_KV] and, when accumulating, the projection output the delta is added to."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_j = j0 + tl.arange(0, BLOCK_KV)
    mask_j = offs_j < KV_SIZE
    factor = tl.load(output_factor_ptr + (target * RANK + offs_r[:, None]) * KV_SIZE + offs_j[None, :],
                     mask=(offs_r < RANK)[:, None] & mask_j[None, :], other=0.0)
    if ACCUMULATE:
        base = tl.load(out_ptr + row * out_row_stride + offs_j, mask=mask_j, other=0.0)
    else:
        base = tl.zeros([BLOCK_KV], out_ptr.dtype.element_ty)
    return factor, base


@triton.jit
def _load_row_operands(row, query_ptr, core_weight_ptr, core_bias_ptr, output_factor_ptr, state_ptr, state_row_stride,
                       state_col_stride, total_ptr, total_row_stride, memory_ptr, k_out_ptr, k_row_stride, v_out_ptr,
                       v_row_stride, SOURCE: tl.constexpr, HAS_MEMORY: tl.constexpr, MATRIX_CORE: tl.constexpr,
                       ACCUMULATE_K: tl.constexpr, ACCUMULATE_V: tl.constexpr, STATE_DIM: tl.constexpr,
                       RANK: tl.constexpr, KV_SIZE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_I: tl.constexpr, BLOCK_KV: tl.constexpr):
    """Every load of a row's finishing work that does not depend on the projection, issued together.

    A load only stalls the program where its value is first used, so issuing them all here costs
    one memory round trip instead of one per dependent step. Shapes too big for one register tile
    bring their first block here and the rest as they go.
    """
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < STATE_DIM
    if SOURCE == NO_SOURCE:
        running = tl.zeros([BLOCK_S], tl.float32)
    else:
        running = tl.load(state_ptr + row * state_row_stride + offs_s * state_col_stride, mask=mask_s, other=0.0)
    if SOURCE == MEAN or SOURCE == ATTENTIVE:
        total = tl.load(total_ptr + row * total_row_stride)
    else:
        total = 0.0  # max pooling and no source keep no total
    if HAS_MEMORY:
        memory = tl.load(memory_ptr + offs_s, mask=mask_s, other=0.0).to(tl.float32)
    else:
        memory = tl.zeros([BLOCK_S], tl.float32)
    if SOURCE == ATTENTIVE:
        query = tl.load(query_ptr + offs_s, mask=mask_s, other=0.0).to(tl.float32)
    else:
        query = tl.zeros([BLOCK_S], tl.float32)
    core_k = _load_core_block(core_weight_ptr, core_bias_ptr, 0, 0, MATRIX_CORE, STATE_DIM, RANK, BLOCK_S, BLOCK_R, BLOCK_I)
    core_v = _load_core_block(core_weight_ptr, core_bias_ptr, 1, 0, MATRIX_CORE, STATE_DIM, RANK, BLOCK_S, BLOCK_R, BLOCK_I)
    tile_k = _load_output_tile(output_factor_ptr, k_out_ptr, k_row_stride, row, 0, 0, ACCUMULATE_K, RANK, KV_SIZE,
                               BLOCK_R, BLOCK_KV)
    tile_v = _load_output_tile(output_factor_ptr, v_out_ptr, v_row_stride, row, 1, 0, ACCUMULATE_V, RANK, KV_SIZE,
                               BLOCK_R, BLOCK_KV)
    return running, total, memory, query, core_k, core_v, tile_k, tile_v


@triton.jit
def _mix_core_block(u, c, weight, bias, i0, dtype, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """``sum_i u[i] G[i, :]`` over the block of G's rows i0 .. i0 + BLOCK_I (G in dtype, as the torch path)."""
    core = _round(tl.sum(weight.to(tl.float32) * c[None, None, :], axis=2) + bias.to(tl.float32), dtype)
    return tl.sum(_pick(u, tl.arange(0, BLOCK_R), i0 + tl.arange(0, BLOCK_I))[:, None] * core, axis=0)


@triton.jit
def _modulate(u, c, core, target, core_weight_ptr, core_bias_ptr, dtype, MATRIX_CORE: tl.constexpr,
              STATE_DIM: tl.constexpr, RANK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_I: tl.constexpr):
    """One target's ``u'``: ``u (I + G(C))`` (matrix core) or ``u * (1 + g(C))`` (gate core).

    ``core`` is the target's first block of core-generator rows, already loaded.
    """
    weight, bias = core
    if MATRIX_CORE:
        mixed = _mix_core_block(u, c, weight, bias, 0, dtype, BLOCK_R, BLOCK_I)
        for i0 in range(BLOCK_I, RANK, BLOCK_I):  # only when one register tile does not cover G
            block_weight, block_bias = _load_core_block(core_weight_ptr, core_bias_ptr, target, i0, MATRIX_CORE,
                                                        STATE_DIM, RANK, BLOCK_S, BLOCK_R, BLOCK_I)
            mixed += _mix_core_block(u, c, block_weight, block_bias, i0, dtype, BLOCK_R, BLOCK_I)
        modulated = _round(u + mixed, dtype)
    else:  # g, then 1 + g, then u (1 + g), each in dtype as the torch path computes them
        gate = _round(tl.sum(weight.to(tl.float32) * c[None, :], axis=1) + bias.to(tl.float32), dtype)
        modulated = _round(u * _round(1.0 + gate, dtype), dtype)
    return modulated


@triton.jit
def _write_output_tile(u, factor, base, out_ptr, out_row_stride, row, j0, dtype, ACCUMULATE: tl.constexpr,
                       KV_SIZE: tl.constexpr, BLOCK_KV: tl.constexpr):
    """``delta = u' @ (alpha B)[target]`` for the tile's columns, stored, or added to the projection
    output in place (delta rounded to dtype first, as the torch path's ``output + delta``)."""
    offs_j = j0 + tl.arange(0, BLOCK_KV)
    delta = tl.sum(u[:, None] * factor.to(tl.float32), axis=0)
    if ACCUMULATE:
        delta = _round(delta, dtype) + base.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + offs_j, delta.to(out_ptr.dtype.element_ty), mask=offs_j < KV_SIZE)


@triton.jit
def _write_target(u, tile, target, output_factor_ptr, out_ptr, out_row_stride, row, dtype, ACCUMULATE: tl.constexpr,
                  RANK: tl.constexpr, KV_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KV: tl.constexpr):
    """All of one target's output, from its first tile (already loaded) and any further tiles."""
    factor, base = tile
    _write_output_tile(u, factor, base, out_ptr, out_row_stride, row, 0, dtype, ACCUMULATE, KV_SIZE, BLOCK_KV)
    for j0 in range(BLOCK_KV, KV_SIZE, BLOCK_KV):  # only when one register tile does not cover the row
        tile_factor, tile_base = _load_output_tile(output_factor_ptr, out_ptr, out_row_stride, row, target, j0,
                                                   ACCUMULATE, RANK, KV_SIZE, BLOCK_R, BLOCK_KV)
        _write_output_tile(u, tile_factor, tile_base, out_ptr, out_row_stride, row, j0, dtype, ACCUMULATE, KV_SIZE,
                           BLOCK_KV)


@triton.jit
def _finish_row(projected, values, u_k, u_v, operands, row, dtype, core_weight_ptr, core_bias_ptr, output_factor_ptr,
                state_ptr, state_row_stride, state_col_stride, total_ptr, total_row_stride, k_out_ptr, k_row_stride,
                v_out_ptr, v_row_stride, score_bound, score_scale, SOURCE: tl.constexpr, HAS_MEMORY: tl.constexpr,
                MATRIX_CORE: tl.constexpr, ACCUMULATE_K: tl.constexpr, ACCUMULATE_V: tl.constexpr,
                STATE_DIM: tl.constexpr, RANK: tl.constexpr, KV_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_KV: tl.constexpr):
    """From one row's projections and operands: the new running state (in place), C, u' and the output.

    ``projected`` is the source's projection of x (the keys for attentive pooling), ``values``
    the attentive values; ``u_k`` and ``u_v`` are ``x A`` for K and V, rounded to the dtype.
    """
    running, total, memory, query, core_k, core_v, tile_k, tile_v = operands
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < STATE_DIM
    state_ptrs = state_ptr + row * state_row_stride + offs_s * state_col_stride
    if SOURCE == MEAN or SOURCE == ATTENTIVE:  # weighted running mean: state = (sum of w v, sum of w)
        if SOURCE == MEAN:
            weight = 1.0
            values = projected
        else:
            score = tl.sum(projected * query, axis=0) / score_scale
            # bound * tanh(score / bound), tanh from exp (the interpreter has no tanh).
            decay = tl.exp(-2.0 * tl.abs(score / score_bound))
            score = score_bound * tl.where(score < 0, -1.0, 1.0) * (1.0 - decay) / (1.0 + decay)
            weight = tl.exp(score - score_bound)
        numerator = weight * values + running
        total = weight + total
        c = numerator / tl.maximum(total, 1.1754943508222875e-38)  # float32 tiny: C = 0 before any token
        tl.store(state_ptrs, numerator, mask=mask_s)
        tl.store(total_ptr + row * total_row_stride, total)
        c = _round(c, dtype)
    elif SOURCE == MAX:  # running max; -inf until a token was seen, which C reads as 0
        running = tl.maximum(projected, running)
        tl.store(state_ptrs, running, mask=mask_s)
        c = _round(tl.where(tl.abs(running) < float("inf"), running, 0.0), dtype)
    else:
        c = tl.zeros([BLOCK_S], tl.float32)
    if HAS_MEMORY:
        memory = _round(memory, dtype)
        if SOURCE == NO_SOURCE:
            c = memory
        else:
            c = _round(c + memory, dtype)
    u_k = _modulate(u_k, c, core_k, 0, core_weight_ptr, core_bias_ptr, dtype, MATRIX_CORE, STATE_DIM, RANK, BLOCK_S,
                    BLOCK_R, BLOCK_I)
    u_v = _modulate(u_v, c, core_v, 1, core_weight_ptr, core_bias_ptr, dtype, MATRIX_CORE, STATE_DIM, RANK, BLOCK_S,
                    BLOCK_R, BLOCK_I)
    _write_target(u_k, tile_k, 0, output_factor_ptr, k_out_ptr, k_row_stride, row, dtype, ACCUMULATE_K, RANK, KV_SIZE,
                  BLOCK_R, BLOCK_KV)
    _write_target(u_v, tile_v, 1, output_factor_ptr, v_out_ptr, v_row_stride, row, dtype, ACCUMULATE_V, RANK, KV_SIZE,
                  BLOCK_R, BLOCK_KV)


@triton.jit
def _decode_step_kernel(
    x_ptr, x_row_stride, x_col_stride, projection_ptr, query_ptr, core_weight_ptr, core_bias_ptr, output_factor_ptr,
    state_ptr, state_row_stride, state_col_stride, total_ptr, total_row_stride, memory_ptr,
    partials_ptr, arrivals_ptr, k_out_ptr, k_row_stride, v_out_ptr, v_row_stride, score_bound, score_scale,
    SOURCE: tl.constexpr, SOURCE_COLS: tl.constexpr, HAS_MEMORY: tl.constexpr, MATRIX_CORE: tl.constexpr,
    ACCUMULATE_K: tl.constexpr, ACCUMULATE_V: tl.constexpr,
    HIDDEN: tl.constexpr, STATE_DIM: tl.constexpr, RANK: tl.constexpr, KV_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_KV: tl.constexpr,
):
    """Grid (splits, batch): program (split, row) projects hidden chunks split, split + splits, ...

    The packed projection's columns are [source (keys) | attentive values | A_K | A_V].
    """
    split = tl.program_id(0)
    row = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    PACKED_COLS: tl.constexpr = SOURCE_COLS + 2 * RANK
    projected = tl.zeros([BLOCK_S], tl.float32)
    values = tl.zeros([BLOCK_S], tl.float32)
    u_k = tl.zeros([BLOCK_R], tl.float32)
    u_v = tl.zeros([BLOCK_R], tl.float32)
    for chunk in range(D_CHUNKS):
        offs_d = (split + chunk * SPLITS) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < HIDDEN
        x_chunk = tl.load(x_ptr + row * x_row_stride + offs_d * x_col_stride, mask=mask_d, other=0.0).to(tl.float32)
        if SOURCE != NO_SOURCE:
            projected = _project(projected, x_chunk, offs_d, mask_d, projection_ptr, 0, STATE_DIM, PACKED_COLS, BLOCK_S)
        if SOURCE == ATTENTIVE:
            values = _project(values, x_chunk, offs_d, mask_d, projection_ptr, STATE_DIM, STATE_DIM, PACKED_COLS,
                              BLOCK_S)
        u_k = _project(u_k, x_chunk, offs_d, mask_d, projection_ptr, SOURCE_COLS, RANK, PACKED_COLS, BLOCK_R)
        u_v = _project(u_v, x_chunk, offs_d, mask_d, projection_ptr, SOURCE_COLS + RANK, RANK, PACKED_COLS, BLOCK_R)
    finishes_row = True
    if SPLITS > 1:
        row_partials_ptr = partials_ptr + row * SPLITS * PACKED_COLS
        if SOURCE != NO_SOURCE:
            _store_partial(row_partials_ptr, split, projected, 0, STATE_DIM, PACKED_COLS, BLOCK_S)
        if SOURCE == ATTENTIVE:
            _store_partial(row_partials_ptr, split, values, STATE_DIM, STATE_DIM, PACKED_COLS, BLOCK_S)
        _store_partial(row_partials_ptr, split, u_k, SOURCE_COLS, RANK, PACKED_COLS, BLOCK_R)
        _store_partial(row_partials_ptr, split, u_v, SOURCE_COLS + RANK, RANK, PACKED_COLS, BLOCK_R)
        # Every thread's partial stores come before the (one-thread) release of the arrival, and
        # the acquire before any thread's reads of the others' partials.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr + row, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        finishes_row = arrived == SPLITS - 1  # the row's last program: every other partial is stored
    if finishes_row:
        # First thing, so that all these loads are in flight with the partials' below.
        operands = _load_row_operands(
            row, query_ptr, core_weight_ptr, core_bias_ptr, output_factor_ptr, state_ptr, state_row_stride,
            state_col_stride, total_ptr, total_row_stride, memory_ptr, k_out_ptr, k_row_stride, v_out_ptr,
            v_row_stride, SOURCE, HAS_MEMORY, MATRIX_CORE, ACCUMULATE_K, ACCUMULATE_V, STATE_DIM, RANK, KV_SIZE,
            BLOCK_S, BLOCK_R, BLOCK_I, BLOCK_KV)
        if SPLITS > 1:
            tl.store(arrivals_ptr + row, 0)
            if SOURCE != NO_SOURCE:
                projected = _sum_partials(row_partials_ptr, 0, STATE_DIM, PACKED_COLS, SPLITS, BLOCK_SPLITS, BLOCK_S)
            if SOURCE == ATTENTIVE:
                values = _sum_partials(row_partials_ptr, STATE_DIM, STATE_DIM, PACKED_COLS, SPLITS, BLOCK_SPLITS,
                                       BLOCK_S)
            u_k = _sum_partials(row_partials_ptr, SOURCE_COLS, RANK, PACKED_COLS, SPLITS, BLOCK_SPLITS, BLOCK_R)
            u_v = _sum_partials(row_partials_ptr, SOURCE_COLS + RANK, RANK, PACKED_COLS, SPLITS, BLOCK_SPLITS,
                                BLOCK_R)
        _finish_row(projected, values, _round(u_k, dtype), _round(u_v, dtype), operands, row, dtype, core_weight_ptr,
                    core_bias_ptr, output_factor_ptr, state_ptr, state_row_stride, state_col_stride, total_ptr,
                    total_row_stride, k_out_ptr, k_row_stride, v_out_ptr, v_row_stride, score_bound, score_scale,
                    SOURCE, HAS_MEMORY, MATRIX_CORE, ACCUMULATE_K, ACCUMULATE_V, STATE_DIM, RANK, KV_SIZE, BLOCK_S,
                    BLOCK_R, BLOCK_I, BLOCK_KV)


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


class FusedDecodeStep:
    """A :class:`MetaKVLayer`'s one-token cached decoding step as one Triton kernel launch.

    The layer's weights are packed once, here (``[source | A]`` side by side, and ``alpha B``);
    the step reads that snapshot, so build a new one after the parameters change. It is for
    decoding only (no autograd). A call issues no host sync and branches on shapes only, so it
    can be captured into a CUDA graph; the per-batch-size scratch buffers are allocated on the
    first call with that batch size (one eager call before capturing also compiles the kernel)
    and kept, so graphs captured for several batch sizes stay valid. A captured graph points at
    this object's packed weights and buffers: keep the object alive as long as the graph.

    The modulation can be added straight into the K/V projection outputs (``k_out``, ``v_out``),
    which saves the separate add kernels of the torch path.

    On CPU tensors the kernel runs only in Triton's interpreter (``TRITON_INTERPRET=1`` set
    before this module is imported).

    Args:
        layer: a layer that :meth:`supports` accepts.
        max_splits: at most this many programs per batch row share the projection over the
            hidden dimension (1: one program per row, no atomics; default: one per hidden chunk).
        num_warps: warps per program (default: the fewest that keep the finishing register
            tiles at ``FINISH_ELEMENTS_PER_THREAD`` elements a thread, so no registers spill).

    Example:
        >>> step = FusedDecodeStep(meta_kv.layers[0])
        >>> delta = step(x, state, memory_state)  # state updated in place
    """

    # Fewer warps mean fewer block barriers in the finishing reductions, more warps fewer registers
    # per thread. Measured on an H100 (perf.md, change 5): 2 warps at SmolLM2's shape, 4 at GPT-2's.
    FINISH_ELEMENTS_PER_THREAD = 192

    def __init__(self, layer: nn.Module, max_splits: int | None = None, num_warps: int | None = None):
        if not self.supports(layer):
            raise ValueError(
                "FusedDecodeStep needs the factorized modulation, a mean/attentive/max source or none, "
                f"and one dtype for every parameter; got {type(layer.modulation).__name__} with "
                f"{type(layer.source).__name__} and dtypes {sorted({str(p.dtype) for p in layer.parameters()})}"
            )
        if max_splits is not None and max_splits < 1:
            raise ValueError(f"max_splits must be >= 1, got {max_splits}")
        if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two from 1 to 16, got {num_warps}")
        modulation, source = layer.modulation, layer.source
        self.source_kind = NO_SOURCE.value if source is None else SOURCE_KINDS[type(source)]
        self.state_tensors = 0 if source is None else STATE_TENSORS[type(source)]
        self.matrix_core = modulation.core == "matrix"
        self.hidden, self.rank = modulation.A.shape[0], modulation.rank
        self.kv_size = modulation.B.shape[-1]
        self.state_dim = modulation.core_generator.in_features
        self.dtype = modulation.A.dtype
        self.score_bound = float(getattr(source, "score_bound", 1.0))
        with torch.no_grad():
            if isinstance(source, AttentivePoolingSource):
                source_weights = [source.key.weight.t(), source.value.weight.t()]
            else:
                source_weights = [] if source is None else [source.proj.weight.t()]
            self.projection = torch.cat([*source_weights, modulation.A], dim=1).contiguous()  # [hidden, packed]
            self.source_columns = self.projection.shape[1] - TARGETS * self.rank
            self.query = source.query.detach().clone() if isinstance(source, AttentivePoolingSource) else None
            self.core_weight = modulation.core_generator.weight.detach().contiguous().clone()
            self.core_bias = modulation.core_generator.bias.detach().clone()
            # Exactly the torch path's block_output(B, alpha) factors: alpha * B in the weights' dtype.
            self.output_factor = (modulation.alpha * modulation.B).contiguous()
        self._pick_blocks()
        self.splits = min(self.hidden_chunks, max_splits or self.hidden_chunks)
        self.d_chunks = triton.cdiv(self.hidden_chunks, self.splits)
        self.num_warps = num_warps or self._warps_for_finishing_tiles()
        self._scratch: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        """Whether the fused kernel computes this layer: factorized modulation, a mean, attentive or
        max source or none (the hypernetwork form, the recurrent source and the addressed bank stay on
        the torch path),
        and all parameters in one dtype."""
        return (
            isinstance(layer.modulation, FactorizedModulation)
            and (layer.source is None or type(layer.source) in SOURCE_KINDS)
            and layer.bank is None
            and len({parameter.dtype for parameter in layer.parameters()}) == 1
        )

    def _pick_blocks(self) -> None:
        """Power-of-two tiles that cover each small dimension and keep register tiles bounded."""
        self.block_s = triton.next_power_of_2(self.state_dim)
        self.block_r = triton.next_power_of_2(self.rank)
        projection_columns = self.source_columns // self.state_dim * self.block_s + TARGETS * self.block_r
        self.block_d = min(MAX_BLOCK_D, triton.next_power_of_2(self.hidden),
                           max(16, _power_of_two_at_most(TILE_ELEMENTS // projection_columns)))
        self.hidden_chunks = triton.cdiv(self.hidden, self.block_d)
        self.block_i = min(self.block_r, _power_of_two_at_most(TILE_ELEMENTS // (self.block_r * self.block_s)))
        self.block_kv = min(triton.next_power_of_2(self.kv_size), _power_of_two_at_most(TILE_ELEMENTS // self.block_r))

    def _warps_for_finishing_tiles(self) -> int:
        """The fewest warps (2 to 8) that hold both targets' first core block and output tile in
        ``FINISH_ELEMENTS_PER_THREAD`` elements a thread."""
        core_block = self.block_i * self.block_r * self.block_s if self.matrix_core else self.block_r * self.block_s
        elements = TARGETS * (core_block + self.block_r * self.block_kv)
        threads = triton.cdiv(elements, self.FINISH_ELEMENTS_PER_THREAD)
        return min(8, max(2, triton.next_power_of_2(triton.cdiv(threads, 32))))

    def _scratch_for(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The partial-projection buffer and the zeroed arrival counters for this batch size."""
        key = (batch, device)
        if key not in self._scratch:
            partials = torch.empty(batch, self.splits, self.projection.shape[1], dtype=torch.float32, device=device)
            arrivals = torch.zeros(batch, dtype=torch.int32, device=device)
            self._scratch[key] = (partials, arrivals)
        return self._scratch[key]

    def _check_output(self, name: str, out: torch.Tensor | None, batch: int) -> None:
        if out is None:
            return
        if out.dim() != 3 or out.shape[0] != batch or out.shape[1] != 1 or out.shape[2] != self.kv_size or out.stride(-1) != 1:
            raise ValueError(f"{name} must be a [{batch}, 1, {self.kv_size}] view with unit stride along its last "
                             f"dimension, got shape {tuple(out.shape)} and strides {out.stride()}")
        if out.dtype != self.dtype or out.device != self.projection.device:
            raise ValueError(f"{name} is {out.dtype} on {out.device}; the layer is {self.dtype} on {self.projection.device}")

    def __call__(self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None, memory_state: torch.Tensor | None,
                 k_out: torch.Tensor | None = None, v_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """The K/V modulation of one decoded token; the running state is updated in place.

        Args:
            x: attention input [batch, 1, hidden] in the weights' dtype.
            state: the source's float32 running state, as ``MetaKVLayer.forward`` returns it
                ((sum [batch, state_dim], total [batch, 1]) for mean and attentive pooling,
                (running max [batch, state_dim],) for max), or None without a source.
            memory_state: the consolidated C [state_dim], or None.
            k_out, v_out: the K / V projection outputs [batch, 1, kv_size] (views, unit stride in
                the last dimension) to add that target's modulation to, in place; None returns it.

        Returns:
            delta [batch, 1, 2 * kv_size] in x's dtype, as ``MetaKVLayer.forward(x, None, state, memory_state)``
            (the half of a target added into its output is left unwritten), or None when both were.
        """
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[2] != self.hidden:
            raise ValueError(f"x must be [batch, 1, {self.hidden}] (one decoded token), got {tuple(x.shape)}")
        if x.dtype != self.dtype or x.device != self.projection.device:
            raise ValueError(
                f"x is {x.dtype} on {x.device} but the packed weights are {self.dtype} on {self.projection.device}"
            )
        batch = x.shape[0]
        if (0 if state is None else len(state)) != self.state_tensors:
            raise ValueError(f"this layer's source keeps {self.state_tensors} state tensors, got "
                             f"{'None' if state is None else len(state)}")
        if state is not None and any(t.dtype != torch.float32 or t.shape[0] != batch for t in state):
            raise ValueError(f"the running state must be float32 with batch {batch}, got "
                             f"{[(tuple(t.shape), t.dtype) for t in state]}")
        if self.state_tensors == 0 and memory_state is None:
            raise ValueError("a layer without a dynamic source needs memory_state (its C)")
        if memory_state is not None and memory_state.shape != (self.state_dim,):
            raise ValueError(f"memory_state must be [{self.state_dim}], got {tuple(memory_state.shape)}")
        self._check_output("k_out", k_out, batch)
        self._check_output("v_out", v_out, batch)
        unused = self.projection  # stands in for the pointers that the kernel's constants switch off
        running = state[0] if state is not None else unused
        total = state[1] if self.state_tensors == 2 else unused
        memory = memory_state.contiguous() if memory_state is not None else unused
        query = self.query if self.query is not None else unused
        partials, arrivals = self._scratch_for(batch, x.device)
        delta = None
        if k_out is None or v_out is None:
            delta = torch.empty(batch, 1, TARGETS * self.kv_size, dtype=x.dtype, device=x.device)
        k_target = k_out if k_out is not None else delta[..., : self.kv_size]
        v_target = v_out if v_out is not None else delta[..., self.kv_size :]
        _decode_step_kernel[(self.splits, batch)](
            x, x.stride(0), x.stride(2), self.projection, query, self.core_weight, self.core_bias,
            self.output_factor, running, running.stride(0), running.stride(-1), total, total.stride(0), memory,
            partials, arrivals, k_target, k_target.stride(0), v_target, v_target.stride(0),
            self.score_bound, math.sqrt(self.state_dim),
            **self.kernel_constants(memory_state is not None, k_out is not None, v_out is not None),
            num_warps=self.num_warps,
        )
        return delta

    def kernel_constants(self, has_memory: bool, accumulate_k: bool, accumulate_v: bool) -> dict[str, int | bool]:
        """The kernel's compile-time constants for this layer (Triton compiles one variant per distinct set).

        Args:
            has_memory: a consolidated C is added to the dynamic one.
            accumulate_k, accumulate_v: that target is added into its projection output in place.
        """
        return dict(
            SOURCE=self.source_kind, SOURCE_COLS=self.source_columns, HAS_MEMORY=has_memory,
            MATRIX_CORE=self.matrix_core, ACCUMULATE_K=accumulate_k, ACCUMULATE_V=accumulate_v,
            HIDDEN=self.hidden, STATE_DIM=self.state_dim, RANK=self.rank, KV_SIZE=self.kv_size,
            BLOCK_D=self.block_d, D_CHUNKS=self.d_chunks, SPLITS=self.splits,
            BLOCK_SPLITS=triton.next_power_of_2(self.splits), BLOCK_S=self.block_s, BLOCK_R=self.block_r,
            BLOCK_I=self.block_i, BLOCK_KV=self.block_kv,
        )
