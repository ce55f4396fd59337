"""The fused kernel compiles for an H100 (sm_90) on any machine, GPU or not.

The kernel tests run in Triton's interpreter on CPU, which executes the Python and never compiles,
so it cannot catch what only the compiler rejects (early returns inside ``if``, shapes that only
meet in compiled code: two such errors were caught this way before they cost device time). Triton's
compiler needs no GPU: this compiles each kind of variant down to a cubin.
"""

import pytest
import torch

from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.modeling.fused_decode import FusedDecodeStep, _decode_step_kernel
from metakv_cl.modeling.meta_kv import MetaKVLayer

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
# The kernel's tensor arguments for a bfloat16 layer (the running state and scratch are float32);
# every other runtime argument is an int stride, but the two float scalars.
ARGUMENT_TYPES = {
    "x_ptr": "*bf16", "projection_ptr": "*bf16", "query_ptr": "*bf16", "core_weight_ptr": "*bf16",
    "core_bias_ptr": "*bf16", "output_factor_ptr": "*bf16", "memory_ptr": "*bf16", "k_out_ptr": "*bf16",
    "v_out_ptr": "*bf16", "state_ptr": "*fp32", "total_ptr": "*fp32", "partials_ptr": "*fp32",
    "arrivals_ptr": "*i32", "score_bound": "fp32", "score_scale": "fp32",
}


@pytest.mark.parametrize("source, core, rank, accumulate", [
    ("mean", "matrix", 8, True),  # SmolLM2's decoding path: K and V added in place
    ("attentive", "matrix", 8, False),
    ("max", "gate", 8, True),
    ("hybrid", "matrix", 8, False),
    ("consolidated", "gate", 8, True),
    ("mean", "matrix", 32, True),  # core blocks and output tiles beyond the first
])
def test_kernel_compiles_for_sm90(source, core, rank, accumulate):
    layer = MetaKVLayer(MetaKVConfig(source=source, core=core, rank=rank, state_dim=64), 576, 192).to(torch.bfloat16)
    step = FusedDecodeStep(layer)
    constants = step.kernel_constants(has_memory=source in ("hybrid", "consolidated"), accumulate_k=accumulate,
                                      accumulate_v=accumulate)
    names = list(_decode_step_kernel.arg_names)
    assert set(constants) <= set(names)
    signature = {name: "constexpr" if name in constants else ARGUMENT_TYPES.get(name, "i32") for name in names}
    kernel = ASTSource(fn=_decode_step_kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(kernel, target=H100, options={"num_warps": step.num_warps})
    assert compiled.asm["cubin"]
