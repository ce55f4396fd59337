"""A static cache keeps the dynamic Meta-KV state in place, so transformers' compiled decoding step can replay.

``generate(cache_implementation="static")`` compiles the decoding step, on CUDA with
``mode="reduce-overhead"``: CUDA graph trees, whose next replay overwrites the memory of the last
replay's outputs. A state that a step returned and the cache fed back to the next step is such an
output. CI has no GPU, so these tests check the two things that make the step replayable: the
state stays at the same addresses from step to step, and a compiled step whose outputs the next
replay overwrites (:class:`OverwritingReplays`, the CUDA graph trees rule on CPU)
decodes what full forwards decode.
"""

import weakref

import pytest
import torch
from transformers import CompileConfig, StaticCache
from transformers.cache_utils import StaticLayer

from metakv_cl.modeling import DYNAMIC_SOURCES, MetaKVConfig, add_meta_kv
from metakv_cl.testing import VOCAB, left_padded_batch, randomize_meta_kv, tiny_llama
from metakv_cl.transformers_api import with_cache

TOLERANCE = 1e-4


def meta_kv_model(factory, source):
    model = add_meta_kv(factory(), MetaKVConfig(source=source, rank=4, state_dim=16))
    randomize_meta_kv(model)
    return model


class OverwritingReplays:
    """A ``torch.compile`` backend that runs each graph eagerly but treats its outputs as CUDA graph trees do.

    Each run overwrites the outputs of the runs before it, so a run that reads one of them as an
    input fails as a replay does on a GPU ("accessing tensor output of CUDAGraphs that has been
    overwritten by a subsequent run"). Outputs that alias an input (a static buffer the graph
    wrote in place) are the caller's memory, not the graph's. Every graph the backend compiles
    shares the outputs, as graph trees share one memory pool.
    """

    def __init__(self):
        # weak references: an output nobody holds is gone, and new inputs may reuse its memory
        self.outputs: list[weakref.ref] = []

    def __call__(self, graph_module, example_inputs, **options):
        def replay(*inputs):
            tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
            overwritten = {_storage(t) for t in (ref() for ref in self.outputs) if t is not None}
            if any(_storage(t) in overwritten for t in tensors):
                raise RuntimeError("accessing tensor output of a replay that has been overwritten by a subsequent run")
            result = graph_module(*inputs)
            own = {_storage(t) for t in tensors}
            self.outputs = [weakref.ref(t) for t in result if isinstance(t, torch.Tensor) and _storage(t) not in own]
            return result

        return replay


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("source", DYNAMIC_SOURCES)
def test_static_cache_writes_the_state_in_place_at_every_step(tiny_model_factory, source):
    model = meta_kv_model(tiny_model_factory, source)
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    new_ids = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    cache = StaticCache(config=model.config, max_cache_len=16)
    full_mask = torch.cat([mask, torch.ones_like(new_ids)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    model(ids, attention_mask=mask, position_ids=positions[:, :8], use_cache=True, **with_cache(model, cache))
    states = cache.meta_kv_states.states
    addresses = {layer: [t.data_ptr() for t in state] for layer, state in states.items()}
    assert addresses
    # marked static: CUDA graph trees skip a graph that writes into an input not so marked
    assert all(getattr(t, "_dynamo_static_input_type", None) for state in states.values() for t in state)
    steps = []
    for step in range(new_ids.shape[1]):
        end = 9 + step
        steps.append(model(new_ids[:, step:step + 1], attention_mask=full_mask[:, :end], position_ids=positions[:, end - 1:end],
                           use_cache=True, **with_cache(model, cache)).logits)
        assert {layer: [t.data_ptr() for t in state] for layer, state in states.items()} == addresses
    reference = model(torch.cat([ids, new_ids], 1), attention_mask=full_mask, position_ids=positions).logits
    torch.testing.assert_close(torch.cat(steps, 1), reference[:, 8:], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("source", DYNAMIC_SOURCES)
def test_compiled_static_generate_survives_replays_that_overwrite_their_outputs(source):
    torch._dynamo.reset()
    model = meta_kv_model(tiny_llama, source)
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    compile_config = CompileConfig(backend=OverwritingReplays(), fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    try:  # the recurrent source's GRU is traced only on request (a graph break would end the one-graph step)
        with torch._dynamo.config.patch(allow_rnn=True):
            static = model.generate(ids, cache_implementation="static", compile_config=compile_config, **settings)
    finally:
        torch._dynamo.reset()
    assert torch.equal(static, model.generate(ids, use_cache=False, **settings))


def test_a_static_cache_refuses_a_crop_into_its_in_place_state(tiny_model_factory):
    model = meta_kv_model(tiny_model_factory, "mean")
    ids, mask, positions = left_padded_batch(batch=2, length=8)
    cache = StaticCache(config=model.config, max_cache_len=16)
    model(ids, attention_mask=mask, position_ids=positions, use_cache=True, **with_cache(model, cache))
    if hasattr(StaticLayer, "crop"):  # transformers >= 5.18 (its deferred stop check crops every step)
        cache.crop(0)  # nothing to remove
    with pytest.raises(ValueError, match="a static cache writes the dynamic Meta-KV state in place"):
        cache.crop(-1)
    assert int(cache.get_seq_length()) == 8


@pytest.mark.parametrize("source", ["mean", "max", "recurrent"])
def test_beam_search_on_a_static_cache_reorders_the_state_in_its_buffers(tiny_model_factory, source):
    model = meta_kv_model(tiny_model_factory, source)
    ids, mask, _ = left_padded_batch(batch=2, length=8)
    settings = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False,
                    output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    static = model.generate(ids, cache_implementation="static", **settings)
    reference = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(static.sequences, reference.sequences)
    torch.testing.assert_close(static.sequences_scores, reference.sequences_scores, atol=TOLERANCE, rtol=0)
