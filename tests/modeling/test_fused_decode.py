"""The fused Triton decoding step against ``MetaKVLayer.forward``, one token at a time.

Without CUDA the kernel runs in Triton's interpreter, which must be chosen before triton is
first imported (Triton's own library functions are decorated then, and other tests import
triton through Lightning). So without CUDA, :func:`test_kernel_in_triton_interpreter` runs
this file again in a fresh process with ``TRITON_INTERPRET=1``, where the kernel tests run; no
other test sees the variable. The interpreter runs a row's programs one after another, so the
last-arriving program is the row's last split: a kernel that let another program update the
state would fail these tests. It rounds float32 to bfloat16 towards zero (GPUs round to
nearest), hence the looser bfloat16 tolerance.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metakv_cl.modeling import add_meta_kv
from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.modeling.fused_decode import FusedDecodeStep
from metakv_cl.modeling.graphed_decoding import GraphedDecoder
from metakv_cl.modeling.meta_kv import MetaKVLayer
from metakv_cl.modeling.sources import MaxSource
from metakv_cl.testing import left_padded_batch, randomize_meta_kv, tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_RUNS_HERE = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
RUN_ELSEWHERE = "run by test_kernel_in_triton_interpreter in its own process"
needs_kernel = pytest.mark.skipif(not KERNEL_RUNS_HERE, reason=RUN_ELSEWHERE)
HIDDEN, KV_SIZE, STATE_DIM, RANK, BATCH = 72, 48, 16, 4, 3
SOURCES = ["mean", "attentive", "max", "consolidated", "hybrid"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DELTA_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}  # times max |delta|


@pytest.mark.skipif(KERNEL_RUNS_HERE, reason="the kernel tests run in this process")
def test_kernel_in_triton_interpreter():
    repository = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=repository, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"the kernel tests failed in Triton's interpreter:\n{result.stdout[-6000:]}{result.stderr[-3000:]}"
    assert RUN_ELSEWHERE not in result.stdout, f"the kernel tests did not run in the interpreter:\n{result.stdout[-3000:]}"


def random_layer(source: str, core: str, dtype: torch.dtype, form: str = "factorized") -> MetaKVLayer:
    """A layer with every parameter random (B too, so the delta is far from zero)."""
    generator = torch.Generator().manual_seed(0)
    layer = MetaKVLayer(MetaKVConfig(source=source, core=core, form=form, rank=RANK, state_dim=STATE_DIM), HIDDEN, KV_SIZE)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return layer.to(device=DEVICE, dtype=dtype)


def starting_state(layer: MetaKVLayer, start: str, memory_state, dtype: torch.dtype, generator: torch.Generator):
    """The running state a left-padded prefill leaves (row 2 all padding), or a random one."""
    if layer.source is None:
        return None
    if start == "prefill":
        x = torch.randn(BATCH, 5, HIDDEN, generator=generator).to(DEVICE, dtype)
        real = torch.ones(BATCH, 5, dtype=torch.bool, device=DEVICE)
        real[1, :2] = False
        real[2] = False
        return layer(x, real, None, memory_state)[1]
    state_dim = layer.modulation.core_generator.in_features
    if isinstance(layer.source, MaxSource):
        running = torch.randn(BATCH, state_dim, generator=generator)
        running[0, :3] = float("-inf")  # features no token has reached yet
        return (running.to(DEVICE),)
    numerator = torch.randn(BATCH, state_dim, generator=generator)
    total = torch.rand(BATCH, 1, generator=generator) + 0.5
    return numerator.to(DEVICE), total.to(DEVICE)


def assert_float32_steps_match(step: FusedDecodeStep, layer: MetaKVLayer, generator: torch.Generator, atol: float):
    """Two fused steps from a random float32 running state give the torch layer's deltas and states."""
    expected_state = starting_state(layer, "random", None, torch.float32, generator)
    state = tuple(t.clone() for t in expected_state)
    for _ in range(2):
        x = torch.randn(BATCH, 1, HIDDEN, generator=generator).to(DEVICE)
        expected, expected_state = layer(x, None, expected_state, None)
        torch.testing.assert_close(step(x, state, None), expected, rtol=1e-5, atol=atol)
        torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)


CASES = [(source, core, dtype, "prefill") for source in SOURCES for core in ("matrix", "gate") for dtype in DTYPES
         if not (dtype == "float16" and core == "gate")]
CASES += [(source, core, "float32", "random") for source in SOURCES if source != "consolidated" for core in ("matrix", "gate")]


@needs_kernel
@pytest.mark.parametrize("source, core, dtype_name, start", CASES)
def test_steps_match_the_torch_layer(source, core, dtype_name, start):
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(1)
    layer = random_layer(source, core, dtype)
    memory_state = torch.randn(STATE_DIM, generator=generator).to(DEVICE, dtype) if source in ("consolidated", "hybrid") else None
    expected_state = starting_state(layer, start, memory_state, dtype, generator)
    state = None if expected_state is None else tuple(t.clone() for t in expected_state)
    addresses = None if state is None else [t.data_ptr() for t in state]
    step = FusedDecodeStep(layer)
    assert (step.splits, step.d_chunks) == (2, 1)  # the hidden dimension is shared by two programs per row
    for _ in range(2):
        x = torch.randn(BATCH, 1, HIDDEN, generator=generator).to(DEVICE, dtype)
        expected, expected_state = layer(x, None, expected_state, memory_state)
        delta = step(x, state, memory_state)
        assert delta.shape == expected.shape and delta.dtype == dtype
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(delta.float(), expected.float(), rtol=0, atol=DELTA_TOLERANCE[dtype] * scale)
        if state is not None:
            torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)
            assert [t.data_ptr() for t in state] == addresses


@needs_kernel
@pytest.mark.parametrize("source, core", [("mean", "matrix"), ("attentive", "gate")])
def test_one_program_per_row_matches_too(source, core):
    generator = torch.Generator().manual_seed(2)
    layer = random_layer(source, core, torch.float32)
    step = FusedDecodeStep(layer, max_splits=1)
    assert (step.splits, step.d_chunks) == (1, 2)  # one program loops over both hidden chunks
    assert_float32_steps_match(step, layer, generator, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("in_place", ["k", "v", "both"])
def test_modulation_is_added_into_projection_outputs(in_place, dtype_name):
    """K and V added in place into strided views of one [Q | K | V] output (GPT-2's c_attn), rounded as ``output + delta``."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(3)
    layer = random_layer("mean", "matrix", dtype)
    expected_state = starting_state(layer, "random", None, dtype, generator)
    state = tuple(t.clone() for t in expected_state)
    step = FusedDecodeStep(layer)
    for _ in range(2):
        x = torch.randn(BATCH, 1, HIDDEN, generator=generator).to(DEVICE, dtype)
        qkv = torch.randn(BATCH, 1, 3 * KV_SIZE, generator=generator).to(DEVICE, dtype)
        expected_delta, expected_state = layer(x, None, expected_state, None)
        expected = qkv.clone()
        expected[..., KV_SIZE:] += expected_delta
        k_out = qkv[..., KV_SIZE : 2 * KV_SIZE] if in_place in ("k", "both") else None
        v_out = qkv[..., 2 * KV_SIZE :] if in_place in ("v", "both") else None
        delta = step(x, state, None, k_out=k_out, v_out=v_out)
        if in_place == "both":
            assert delta is None
        else:  # the other target comes back in its half of delta
            half = slice(KV_SIZE, None) if in_place == "k" else slice(None, KV_SIZE)
            qkv[..., KV_SIZE:][..., half] += delta[..., half]
        tolerance = DELTA_TOLERANCE[dtype] * expected_delta.float().abs().max().item()
        torch.testing.assert_close(qkv.float(), expected.float(), rtol=0, atol=tolerance)
        assert torch.equal(qkv[..., :KV_SIZE], expected[..., :KV_SIZE])  # Q untouched
        torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("core", ["matrix", "gate"])
def test_layers_larger_than_one_register_tile_loop_over_blocks(core):
    """Rank 32 and K/V 640: G's rows and the output columns come in several blocks after the first."""
    generator = torch.Generator().manual_seed(4)
    layer = MetaKVLayer(MetaKVConfig(source="attentive", core=core, rank=32, state_dim=64), HIDDEN, 640)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    layer = layer.to(DEVICE)
    step = FusedDecodeStep(layer)
    assert step.block_kv < 640 and (core == "gate" or step.block_i < 32)
    assert_float32_steps_match(step, layer, generator, atol=1e-5)


def assert_fused_decoding_equals_generate(model, monkeypatch):
    """Greedy decoding through the kernel, run from the projection hooks, equals ``generate``."""
    randomize_meta_kv(model)
    model = model.to(DEVICE).eval()
    ids, mask, _ = left_padded_batch(length=8)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 8:]
    calls = []
    original_call = FusedDecodeStep.__call__
    monkeypatch.setattr(FusedDecodeStep, "__call__", lambda step, *args, **kwargs: calls.append(kwargs) or original_call(step, *args, **kwargs))
    decoder = GraphedDecoder(model, batch_size=3, max_cache_len=32, cuda_graph=False, fused_meta_kv=True)
    assert torch.equal(decoder.generate(ids, attention_mask=mask, max_new_tokens=6), expected)
    assert len(calls) == 5 * len(decoder.fused_steps)  # every layer of every one-token step
    # added in place into the first K or V output to appear, not through a separate add
    assert all(call["k_out"] is not None or call["v_out"] is not None for call in calls)


@needs_kernel
@pytest.mark.parametrize("source", ["mean", "attentive", "max", "hybrid", "consolidated"])
def test_fused_decoding_inside_the_model_equals_generate(tiny_model_factory, source, monkeypatch):
    """GPT-2 gets K and V added into c_attn's output, Llama K into k_proj's and V from the
    returned delta at v_proj."""
    model = add_meta_kv(tiny_model_factory(), MetaKVConfig(source=source, rank=4, state_dim=16))
    assert_fused_decoding_equals_generate(model, monkeypatch)


@needs_kernel
@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text", "phi3"])
def test_fused_decoding_adds_into_every_projection_layout(model_type, monkeypatch):
    """V first and K into k_norm's output, time-major (Qwen3) or head-major (Gemma 3); Phi-3's
    fused Linear qkv_proj."""
    torch.manual_seed(0)
    # GraphedDecoder masks its whole cache, which a sliding-window layer does not hold: a window
    # longer than that cache
    overrides = {"sliding_window": 64} if model_type == "gemma3_text" else {}
    model = add_meta_kv(tiny_model(model_type, **overrides), MetaKVConfig(source="mean", rank=4, state_dim=16))
    assert_fused_decoding_equals_generate(model, monkeypatch)


@pytest.mark.skipif(DEVICE != "cuda", reason="concurrent programs need a GPU (the interpreter runs them in turn)")
def test_many_concurrent_programs_per_row_on_gpu():
    """32 programs per row and 64 rows at once: the last-arriving program must see every partial."""
    layer = MetaKVLayer(MetaKVConfig(source="attentive", rank=8, state_dim=64), 2048, 256).to(DEVICE)
    with torch.no_grad():
        layer.modulation.B.normal_(std=0.1)
    expected_state = layer(torch.randn(64, 4, 2048, device=DEVICE), None, None, None)[1]
    state = tuple(t.clone() for t in expected_state)
    step = FusedDecodeStep(layer, max_splits=32)
    assert (step.splits, step.d_chunks) == (32, 2)
    for _ in range(20):
        x = torch.randn(64, 1, 2048, device=DEVICE)
        expected, expected_state = layer(x, None, expected_state, None)
        torch.testing.assert_close(step(x, state, None), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-5)


def test_bad_launch_settings_are_named():
    layer = random_layer("mean", "gate", torch.float32)
    with pytest.raises(ValueError, match="max_splits must be >= 1"):
        FusedDecodeStep(layer, max_splits=0)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        FusedDecodeStep(layer, num_warps=3)


def test_unsupported_layers_are_refused():
    assert not FusedDecodeStep.supports(random_layer("mean", "matrix", torch.float32, form="hypernetwork"))
    assert not FusedDecodeStep.supports(random_layer("recurrent", "matrix", torch.float32))
    assert FusedDecodeStep.supports(random_layer("hybrid", "gate", torch.float32))
    with pytest.raises(ValueError, match="HypernetworkModulation"):
        FusedDecodeStep(random_layer("mean", "matrix", torch.float32, form="hypernetwork"))
    with pytest.raises(ValueError, match="RecurrentSource"):
        FusedDecodeStep(random_layer("recurrent", "gate", torch.float32))


def test_bad_inputs_are_named():
    mean_step = FusedDecodeStep(random_layer("mean", "gate", torch.float32))
    state = (torch.zeros(BATCH, STATE_DIM, device=DEVICE), torch.zeros(BATCH, 1, device=DEVICE))
    x = torch.zeros(BATCH, 1, HIDDEN, device=DEVICE)
    with pytest.raises(ValueError, match="one decoded token"):
        mean_step(torch.zeros(BATCH, 2, HIDDEN, device=DEVICE), state, None)
    with pytest.raises(ValueError, match="packed weights are torch.float32"):
        mean_step(x.bfloat16(), state, None)
    with pytest.raises(ValueError, match="keeps 2 state tensors"):
        mean_step(x, None, None)
    with pytest.raises(ValueError, match="batch 3"):
        mean_step(x, (state[0][:2], state[1][:2]), None)
    with pytest.raises(ValueError, match="k_out must be a"):
        mean_step(x, state, None, k_out=torch.zeros(BATCH, 1, KV_SIZE + 1, device=DEVICE))
    with pytest.raises(ValueError, match="unit stride"):
        mean_step(x, state, None, v_out=torch.zeros(BATCH, 1, 2 * KV_SIZE, device=DEVICE)[..., ::2])
    with pytest.raises(ValueError, match="needs memory_state"):
        FusedDecodeStep(random_layer("consolidated", "gate", torch.float32))(x, None, None)
