"""Regional compilation of a model's repeated transformer blocks, for training.

``torch.compile(model)`` traces every decoder layer on its own: for a 30-layer model with dynamic
shapes that is minutes of compilation before the first step, and every new batch shape that
trips one of inductor's size guards compiles the whole model again inside the run. The layers of
a transformer run one code object, so compiling each block instead (PyTorch's "regional
compilation" recipe) gives one graph that every layer, and every later copy of the model, reuses:
seconds to compile, and a recompilation costs one block. Embeddings, the attention mask (built
from restarting ``position_ids`` for packed rows) and the output layer stay eager. The loss over the
logits is compiled on its own (:meth:`BlockCompiler.compiled`): eager, it writes an fp32 copy of the
``[rows, length, vocabulary]`` logits and their log-softmax (3.2 GB for 8 x 1,024 tokens of a
50k vocabulary, twice again in the backward); compiled, the upcast, log-sum-exp and gather are one
kernel that reads the bf16 logits once.

The compiled blocks are active only inside :meth:`BlockCompiler.active`, so evaluation, generation
and KV-cache paths run the eager model, and no compiled callable is left on the model for a deep
copy, a pickle or a checkpoint to meet.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

#: graphs dynamo may keep per block before it gives up compiling (shape families x methods in one process)
GRAPHS_PER_BLOCK = 16


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the longest ``nn.ModuleList`` of one class that transformers
    lists in a ``_no_split_modules`` of the model (GPT2Block, LlamaDecoderLayer, ...).

    Works through wrappers (a peft ``PeftModel``) since it searches every submodule.

    Args:
        model: a transformers causal LM, wrapped or not.

    Returns:
        The blocks in order; empty when the model declares none.
    """
    block_classes = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            classes = {type(child).__name__ for child in module}
            if len(classes) == 1 and classes <= block_classes:
                best = list(module)
    return best


class BlockCompiler:
    """Compiled versions of a model's blocks (:func:`repeated_blocks`), switched on per forward.

    The blocks of a model are found and their compiled callables made once, the first time the
    model runs here (not at every step); a new model object (a peft wrapper, a copy) gets its own,
    which reuse the graphs already traced for the block class wherever dynamo's guards allow.
    Adapters injected into a block keep the block, so they need no new callable.

    Args:
        dynamic: ``torch.compile``'s ``dynamic`` (default True: batch and length vary from step to step).

    Raises:
        ValueError: at :meth:`active`, a model without repeated blocks to compile.
    """

    def __init__(self, dynamic: bool | None = True):
        self.dynamic = dynamic
        self._model: nn.Module | None = None
        self._calls: list[tuple[nn.Module, Callable]] = []  # (block, its compiled call) of _model
        self._functions: dict[Callable, Callable] = {}  # function -> its compiled version

    def compiled(self, function: Callable) -> Callable:
        """``function`` compiled (once per function, with this compiler's ``dynamic``): for the
        tensor arithmetic of a training step outside the model, such as the loss over the logits."""
        if function not in self._functions:
            self._functions[function] = torch.compile(function, dynamic=self.dynamic)
        return self._functions[function]

    def _prepare(self, model: nn.Module) -> None:
        blocks = repeated_blocks(model)
        if not blocks:
            raise ValueError(
                f"compile: found no repeated transformer blocks in {type(model).__name__} (a ModuleList of a class "
                "named in the model's _no_split_modules); set compile: false for this model"
            )
        # dynamo keeps at most recompile_limit graphs per code object, then runs it eagerly without a
        # word; every block shares Module._call_impl, and blocks that differ per layer (Meta-KV's
        # hooks hold their layer's index) or per method (frozen or trainable weights) each need graphs
        wanted = GRAPHS_PER_BLOCK * len(blocks)
        for limit in ("recompile_limit", "accumulated_recompile_limit"):
            if getattr(torch._dynamo.config, limit) < wanted:
                setattr(torch._dynamo.config, limit, wanted)
        self._model = model
        self._calls = [(block, torch.compile(block._call_impl, dynamic=self.dynamic)) for block in blocks]

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        """Run ``model``'s blocks compiled inside the block (their backward too, since autograd
        records the compiled graphs); eager again on exit."""
        if model is not self._model:
            self._prepare(model)
        # nn.Module.__call__ runs _compiled_call_impl when set: this is what Module.compile() sets,
        # here only for the duration of one forward
        for block, call in self._calls:
            block._compiled_call_impl = call
        try:
            yield
        finally:
            for block, _ in self._calls:
                block._compiled_call_impl = None

    def __getstate__(self) -> dict:
        # compiled callables do not pickle or deep-copy; a copy compiles its own blocks
        return {"dynamic": self.dynamic, "_model": None, "_calls": [], "_functions": {}}

    def __deepcopy__(self, memo: dict) -> "BlockCompiler":
        return BlockCompiler(self.dynamic)
