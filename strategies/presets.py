"""The named methods of configs and reports, each a :class:`ContinualStrategy` with a fixed list
of method plugins.

A preset takes its method's options and the strategy's own (``train_mb_size``, ``name``, ...)
as keyword arguments, so a config names it by class path
(``class_path: metakv_cl.strategies.EWC``, ``init_args: {mode: online}``); ``plugins`` adds
more plugins after the preset's own. The method's options are its plugins' own arguments, read
from the plugins' signatures and docstrings (:class:`PluginArguments`, :func:`takes_plugin_arguments`),
so a plugin argument is written once, in its plugin. Every preset builds exactly this list:

===============================  ===========================================================
preset                           plugins
===============================  ===========================================================
``Naive``                        none
``EWC(...)``                     ``[plugins.EWC(...)]``
``LwF(...)``                     ``[plugins.LwF(...)]``
``LoRA(...)``                    ``[plugins.LoRA(...)]``
``OLoRA(...)``                   ``[plugins.OLoRA(...)]``
``KNNLM(...)``                   ``[plugins.KNNLM(...)]``
``RetrievedExamples(...)``       ``[plugins.RetrievedExamples(...)]``
``Replay(...)``                  ``[plugins.Replay(...)]``
``MetaKVConsolidation(...)``     ``[plugins.Replay(buffer_size, storage_policy),
                                 plugins.MetaKVConsolidation(...)]``, then
                                 ``plugins.Validated(validation_fraction, patience,
                                 phases=["consolidate"])`` when ``validation_fraction`` > 0
``MetaKVAddressed(...)``         the list of ``MetaKVConsolidation(...)``, then
                                 ``plugins.BankSchedule(slots_per_experience, old_slots,
                                 old_slots_weight)``
===============================  ===========================================================
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import docstring_parser
from avalanche.core import BasePlugin

from metakv_cl.strategies import plugins as methods
from metakv_cl.strategies.base import ContinualStrategy


class PluginArguments:
    """The arguments of a method plugin that a preset takes as keyword arguments of its own.

    Read from the plugin's ``__init__`` (names, types, defaults) and docstring (``Args``).

    Args:
        plugin_class: the method plugin.
        leave_out: arguments the preset sets itself rather than taking them.
        defaults: the preset's defaults where they differ from the plugin's.

    Raises:
        TypeError: ``defaults`` names an argument that the plugin does not take.
    """

    def __init__(self, plugin_class: type, *, leave_out: Sequence[str] = (), defaults: Mapping[str, Any] | None = None):
        self.plugin_class = plugin_class
        overridden = dict(defaults or {})
        # eval_str: the plugin modules postpone their annotations, and jsonargparse would evaluate
        # the strings in this module, which does not import the plugins' types
        signature = inspect.signature(plugin_class.__init__, eval_str=True)
        self.parameters = [
            parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=overridden.pop(name, parameter.default))
            for name, parameter in list(signature.parameters.items())[1:]  # after self
            if name not in leave_out
        ]
        if overridden:
            raise TypeError(f"{plugin_class.__name__} takes no argument {', '.join(overridden)}")

    def pop(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Take these arguments out of a preset's ``kwargs``: each given value, else its default."""
        return {parameter.name: kwargs.pop(parameter.name, parameter.default) for parameter in self.parameters}

    def docstring_args(self) -> str:
        """The plugin's ``Args`` entries of these arguments, as lines of a Google-style ``Args`` section."""
        names = {parameter.name for parameter in self.parameters}
        lines = []
        for source in (self.plugin_class, self.plugin_class.__init__):
            for param in docstring_parser.parse(source.__doc__ or "").params:
                if param.arg_name in names and param.description:
                    first, *rest = param.description.splitlines()
                    lines += [f"    {param.arg_name}: {first}", *(f"        {line}" for line in rest)]
        return "\n".join(lines)


def takes_plugin_arguments(*plugin_arguments: PluginArguments) -> Callable[[Callable], Callable]:
    """Give a preset's ``__init__(self, **kwargs)`` the plugins' arguments in its signature and docstring.

    jsonargparse (LightningCLI) and ``benchmarks/cl_suite.py`` read a preset's arguments from
    ``inspect.signature(Preset.__init__)``, which returns ``__signature__``; jsonargparse takes
    their help from the ``Args`` of the ``__init__`` docstring, and follows ``**kwargs`` into
    ``super().__init__(**kwargs)`` for the strategy's own arguments, as for a written-out signature.

    Raises:
        TypeError: two plugins take an argument of the same name.
    """

    def decorate(init: Callable) -> Callable:
        self_parameter, kwargs_parameter = inspect.signature(init).parameters.values()
        taken = [parameter for arguments in plugin_arguments for parameter in arguments.parameters]
        names = [parameter.name for parameter in taken]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise TypeError(f"plugins of one preset take the same arguments: {', '.join(repeated)}")
        init.__signature__ = inspect.Signature([self_parameter, *taken, kwargs_parameter])
        plugin_names = ", ".join(arguments.plugin_class.__name__ for arguments in plugin_arguments)
        # docstring-parser reads an Args section only after a summary line
        init.__doc__ = f"Takes the arguments of the plugins {plugin_names}.\n\nArgs:\n" + "\n".join(
            arguments.docstring_args() for arguments in plugin_arguments
        )
        return init

    return decorate


def _put_first(method_plugins: list[BasePlugin], kwargs: dict[str, Any]) -> None:
    """Put the preset's plugins in the strategy arguments ``kwargs``, before any the caller gave.

    (Presets then call ``super().__init__(**kwargs)`` as written, which is how jsonargparse
    finds the strategy's own arguments of a preset.)
    """
    kwargs["plugins"] = [*method_plugins, *(kwargs.get("plugins") or [])]


class Naive(ContinualStrategy):
    """Sequential fine-tuning of the whole model with the plain language-modelling loss.

    Takes the arguments of :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "naive"


_EWC_ARGUMENTS = PluginArguments(methods.EWC)


class EWC(ContinualStrategy):
    """Elastic Weight Consolidation: :class:`metakv_cl.strategies.plugins.EWC` on the strategy.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.EWC` and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "ewc"

    @takes_plugin_arguments(_EWC_ARGUMENTS)
    def __init__(self, **kwargs: Any):
        _put_first([methods.EWC(**_EWC_ARGUMENTS.pop(kwargs))], kwargs)
        super().__init__(**kwargs)


_LWF_ARGUMENTS = PluginArguments(methods.LwF)


class LwF(ContinualStrategy):
    """Learning without Forgetting: :class:`metakv_cl.strategies.plugins.LwF` on the strategy.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.LwF` and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "lwf"

    @takes_plugin_arguments(_LWF_ARGUMENTS)
    def __init__(self, **kwargs: Any):
        _put_first([methods.LwF(**_LWF_ARGUMENTS.pop(kwargs))], kwargs)
        super().__init__(**kwargs)


_LORA_ARGUMENTS = PluginArguments(methods.LoRA)


class LoRA(ContinualStrategy):
    """LoRA adapters: :class:`metakv_cl.strategies.plugins.LoRA` on the strategy.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.LoRA` and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "lora"

    @takes_plugin_arguments(_LORA_ARGUMENTS)
    def __init__(self, **kwargs: Any):
        _put_first([methods.LoRA(**_LORA_ARGUMENTS.pop(kwargs))], kwargs)
        super().__init__(**kwargs)


_OLORA_ARGUMENTS = PluginArguments(methods.OLoRA)


class OLoRA(ContinualStrategy):
    """O-LoRA, orthogonal LoRA subspaces per experience: :class:`metakv_cl.strategies.plugins.OLoRA`
    on the strategy.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.OLoRA` and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "olora"

    @takes_plugin_arguments(_OLORA_ARGUMENTS)
    def __init__(self, **kwargs: Any):
        _put_first([methods.OLoRA(**_OLORA_ARGUMENTS.pop(kwargs))], kwargs)
        super().__init__(**kwargs)


_KNNLM_ARGUMENTS = PluginArguments(methods.KNNLM)


class KNNLM(ContinualStrategy):
    """kNN-LM, each experience's training text added to a datastore: :class:`metakv_cl.strategies.plugins.KNNLM`
    on the strategy.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.KNNLM` and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "knn-lm"

    @takes_plugin_arguments(_KNNLM_ARGUMENTS)
    def __init__(self, **kwargs: Any):
        _put_first([methods.KNNLM(**_KNNLM_ARGUMENTS.pop(kwargs))], kwargs)
        super().__init__(**kwargs)


_RETRIEVEDEXAMPLES_ARGUMENTS = PluginArguments(methods.RetrievedExamples)


class RetrievedExamples(ContinualStrategy):
    """Retrieval-augmented classification, each experience's labelled training items retrieved as
    in-context examples: :class:`metakv_cl.strategies.plugins.RetrievedExamples` on the strategy.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.RetrievedExamples` and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "retrieval-icl"

    @takes_plugin_arguments(_RETRIEVEDEXAMPLES_ARGUMENTS)
    def __init__(self, **kwargs: Any):
        _put_first([methods.RetrievedExamples(**_RETRIEVEDEXAMPLES_ARGUMENTS.pop(kwargs))], kwargs)
        super().__init__(**kwargs)


_REPLAY_ARGUMENTS = PluginArguments(methods.Replay)


class Replay(ContinualStrategy):
    """Experience replay: :class:`metakv_cl.strategies.plugins.Replay` on the strategy.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.Replay` and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "replay"

    @takes_plugin_arguments(_REPLAY_ARGUMENTS)
    def __init__(self, **kwargs: Any):
        _put_first([methods.Replay(**_REPLAY_ARGUMENTS.pop(kwargs))], kwargs)
        super().__init__(**kwargs)


_CONSOLIDATION_ARGUMENTS = PluginArguments(methods.MetaKVConsolidation)
# the consolidation fit alone is validated, and only when asked: validation_fraction 0 is off
_CONSOLIDATION_VALIDATION_ARGUMENTS = PluginArguments(
    methods.Validated, leave_out=("phases",), defaults={"validation_fraction": 0.0}
)
_CONSOLIDATION_REPLAY_ARGUMENTS = PluginArguments(methods.Replay)


class MetaKVConsolidation(ContinualStrategy):
    """Meta-KV consolidation on a replay buffer, optionally validated.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.MetaKVConsolidation`, of its
    replay buffer (:class:`metakv_cl.strategies.plugins.Replay`), of its validated schedule
    (:class:`metakv_cl.strategies.plugins.Validated` but ``phases``) and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.

    Args:
        validation_fraction: if > 0, a :class:`metakv_cl.strategies.plugins.Validated` schedule
            on the consolidation fit with this share of its items held out.
        patience: the validated schedule's patience.
    """

    strategy_name = "metakv"
    uses_meta_kv = True

    @takes_plugin_arguments(
        _CONSOLIDATION_ARGUMENTS, _CONSOLIDATION_VALIDATION_ARGUMENTS, _CONSOLIDATION_REPLAY_ARGUMENTS
    )
    def __init__(self, **kwargs: Any):
        self.consolidation = methods.MetaKVConsolidation(**_CONSOLIDATION_ARGUMENTS.pop(kwargs))
        validation = _CONSOLIDATION_VALIDATION_ARGUMENTS.pop(kwargs)
        chosen = [methods.Replay(**_CONSOLIDATION_REPLAY_ARGUMENTS.pop(kwargs)), self.consolidation]
        if validation["validation_fraction"] != 0:
            chosen.append(methods.Validated(**validation, phases=["consolidate"]))
        _put_first(chosen, kwargs)
        super().__init__(**kwargs)

    def default_method_name(self) -> str:
        return self.consolidation.method_name  # its buffer and schedule are part of the method


_BANK_SCHEDULE_ARGUMENTS = PluginArguments(methods.BankSchedule)


class MetaKVAddressed(MetaKVConsolidation):
    """Meta-KV consolidation into the addressed bank: new slots per experience, old slots protected.

    The model needs ``meta_kv: {source: addressed, memory_slots: ...}`` with room for
    ``slots_per_experience`` slots per experience of the stream.

    Takes the arguments of :class:`metakv_cl.strategies.plugins.BankSchedule`, of
    :class:`MetaKVConsolidation` (the consolidation, its replay buffer and validation) and of
    :class:`~metakv_cl.strategies.base.ContinualStrategy`.
    """

    strategy_name = "metakv-addressed"

    @takes_plugin_arguments(_BANK_SCHEDULE_ARGUMENTS)
    def __init__(self, **kwargs: Any):
        self.bank_schedule = methods.BankSchedule(**_BANK_SCHEDULE_ARGUMENTS.pop(kwargs))
        _put_first([self.bank_schedule], kwargs)  # MetaKVConsolidation puts its own plugins before it
        super().__init__(**kwargs)

    def default_method_name(self) -> str:
        return f"{self.consolidation.method_name}+{self.bank_schedule.method_name}"
