"""``ContinualLMModule(compile=True)`` in the engine: one graph per block class and shape family, no
recompilation storm, nothing compiled left on the model."""

import functools

import pytest
import pytorch_lightning as pl
import torch

from metakv_cl.strategies import Naive
from metakv_cl.training.compilation import BlockCompiler, repeated_blocks
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs


class BatchShapes(pl.Callback):
    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.shapes.append(tuple(batch["input_ids"].shape))


@pytest.fixture
def compiled_graphs(monkeypatch):
    """Every graph the engine's ``torch.compile`` hands to its backend (run eagerly: dynamo's
    guards and recompilations are the backend's, the graphs need no code generation here)."""
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    yield graphs
    torch._dynamo.reset()


def block_graphs(graphs) -> list:
    """The graphs of transformer blocks (not of the loss over the logits)."""
    return [graph for graph in graphs if "cross_entropy" not in graph.code]


@pytest.mark.parametrize(("pack_length", "most_graphs"), [(None, 2), (64, 2)], ids=["padded", "packed"])
def test_varying_batch_shapes_compile_a_bounded_number_of_graphs(tmp_path, compiled_graphs, pack_length, most_graphs):
    torch.manual_seed(0)
    benchmark, module = toy_setup(1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    module.block_compiler = BlockCompiler()
    shapes = BatchShapes()
    kwargs = toy_trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=False, callbacks=[shapes])
    strategy = Naive(module=module, trainer_kwargs=kwargs, train_mb_size=8, train_pack_length=pack_length)
    strategy.train(benchmark.train_stream[0], eval_streams=[])
    assert len(set(shapes.shapes)) >= 2  # the shapes did vary: padded lengths, or 2 rows and 1 row packed
    # both layers reuse the dynamic graphs of their block: padded, one with an attention mask and
    # one without (a batch with no padding needs none); packed, one more for a batch of a single
    # row, since dynamo specialises size 1
    assert len(repeated_blocks(module.model)) == 2
    blocks = block_graphs(compiled_graphs)
    assert 1 <= len(blocks) <= most_graphs, f"{len(blocks)} graphs for shapes {sorted(set(shapes.shapes))}"
    assert 1 <= len(compiled_graphs) - len(blocks) <= most_graphs  # the loss: dynamic too


def test_blocks_are_found_through_peft_and_for_llama():
    from peft import LoraConfig, get_peft_model

    from metakv_cl.testing import tiny_gpt2, tiny_llama

    llama = tiny_llama()
    assert [type(block).__name__ for block in repeated_blocks(llama)] == ["LlamaDecoderLayer"] * llama.config.num_hidden_layers
    wrapped = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    assert len(repeated_blocks(wrapped)) == wrapped.config.n_layer


def test_compiled_blocks_are_active_only_inside_the_training_forward(compiled_graphs):
    import copy

    from metakv_cl.testing import tiny_gpt2
    from metakv_cl.training.module import ContinualLMModule

    module = ContinualLMModule(tiny_gpt2(), compile=True)
    ids = torch.randint(1, 90, (2, 8))
    module.training_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, 0)
    assert len(block_graphs(compiled_graphs)) == 1  # every layer ran the one graph of its block
    assert len(compiled_graphs) == 2  # and the loss its own
    assert all(block._compiled_call_impl is None for block in repeated_blocks(module.model))
    copy.deepcopy(module)  # nothing compiled stays on the model or the compiler for a copy to meet


def test_a_model_without_repeated_blocks_is_refused():
    compiler = BlockCompiler()
    with pytest.raises(ValueError, match="compile: found no repeated transformer blocks in Linear"):
        with compiler.active(torch.nn.Linear(2, 2)):
            pass


def test_the_compiled_loss_equals_the_eager_loss():
    from metakv_cl.testing import tiny_gpt2
    from metakv_cl.training.module import ContinualLMModule

    torch.manual_seed(0)
    model = tiny_gpt2()
    eager, compiled = ContinualLMModule(model), ContinualLMModule(model, compile=True)
    ids = torch.randint(1, 90, (3, 12))
    labels = ids.masked_fill(torch.arange(12) >= 9, -100)  # unscored tail positions, as padding has
    outputs = model(input_ids=ids)
    batch = {"input_ids": ids, "labels": labels}
    expected, got = eager.lm_loss(batch, outputs), compiled.lm_loss(batch, outputs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    assert int(got[2]) == int(expected[2]) == 3 * 8
    assert compiled.block_compiler._functions  # the loss did go through the compiler


@pytest.mark.parametrize("source", ["mean", "consolidated"])
def test_meta_kv_blocks_share_one_graph_across_layers(compiled_graphs, source):
    """Every layer's Meta-KV hooks trace to the same code: a 4-layer model compiles its block once
    per shape family, as the plain model does, not once per layer index."""
    from metakv_cl.modeling import MetaKVConfig, add_meta_kv
    from metakv_cl.testing import tiny_llama
    from metakv_cl.training.module import ContinualLMModule

    torch.manual_seed(0)
    model = add_meta_kv(tiny_llama(num_hidden_layers=4), MetaKVConfig(source=source, rank=4, state_dim=16))
    module = ContinualLMModule(model, compile=True)
    for length in (12, 16):
        ids = torch.randint(1, 90, (3, length))
        module.training_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, 0).backward()
    blocks = block_graphs(compiled_graphs)
    assert 1 <= len(blocks) <= 2, f"{len(blocks)} block graphs for 4 layers"


@pytest.mark.parametrize("source", [None, "mean"], ids=["plain", "meta_kv_mean"])
def test_compiled_evaluation_scores_each_item_as_the_eager_one(tmp_path, compiled_graphs, source):
    """Language-modelling test sets are scored through the compiled blocks (a no-grad graph of
    their own, reused across batch lengths), item for item as eagerly."""
    import copy

    from metakv_cl.modeling import MetaKVConfig, meta_kv_parameters

    torch.manual_seed(0)
    meta_kv = None if source is None else MetaKVConfig(source=source, rank=4, state_dim=16)
    benchmark, module = toy_setup(2, meta_kv=meta_kv, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if source is not None:  # a modulation that is not zero (B starts at zero)
        with torch.no_grad():
            for parameter in meta_kv_parameters(module.model):
                parameter.normal_(std=0.3)
    items = []
    for compiled in (False, True):
        candidate = copy.deepcopy(module)
        candidate.block_compiler = BlockCompiler() if compiled else None
        strategy = Naive(module=candidate, trainer_kwargs=toy_trainer_kwargs(tmp_path / str(compiled)), eval_mb_size=3)
        strategy.eval(benchmark.test_stream)
        items.append([strategy.eval_items[index]["nll"] for index in sorted(strategy.eval_items)])
    lengths = {int(item["input_ids"].shape[0]) for experience in benchmark.test_stream for item in experience.dataset}
    assert len(lengths) >= 3  # the batches did differ in length
    eager, compiled = (torch.tensor([nll for task in run for nll in task]) for run in items)
    assert torch.allclose(eager, compiled, atol=2e-4)  # the per-item lists are rounded to 1e-4 nats
    blocks = block_graphs(compiled_graphs)
    assert 1 <= len(blocks) <= 3, f"{len(blocks)} block graphs for test lengths {sorted(lengths)}"
