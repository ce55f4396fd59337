"""Methods compose as plugins of one strategy, and Avalanche's own plugins act on its training."""

import math

import pytest
import torch
from avalanche.evaluation.metrics import loss_metrics
from avalanche.logging import CSVLogger, InteractiveLogger, TextLogger
from avalanche.training.plugins import (
    EarlyStoppingPlugin,
    EvaluationPlugin,
    EWCPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    ReplayPlugin,
    SynapticIntelligencePlugin,
)

from metakv_cl.metrics import ContinualMatrixPluginMetric
from metakv_cl.modeling import MetaKVConfig
from metakv_cl.strategies import (
    EWC,
    KNNLM,
    ContinualStrategy,
    LoRA,
    LwF,
    MetaKVConsolidation,
    Naive,
    OLoRA,
    Replay,
    RetrievedExamples,
)
from metakv_cl.strategies import plugins
from metakv_cl.strategies.plugins import PluginConflictError, UnsupportedPluginError
from metakv_cl.training.runner import run_stream
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs

META_KV = MetaKVConfig(source="consolidated", rank=4, state_dim=16)


def make(tmp_path, plugin_list=(), num_experiences=2, epochs=1, strategy_cls=ContinualStrategy, meta_kv=None, **kwargs):
    torch.manual_seed(0)
    benchmark, module = toy_setup(num_experiences, meta_kv=meta_kv)
    strategy = strategy_cls(
        module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path, max_epochs=epochs), train_mb_size=8,
        plugins=list(plugin_list), **kwargs,
    )
    return strategy, benchmark


# ---------------------------------------------------------------------------- composition


@pytest.mark.parametrize("preset, kwargs, expected", [
    (Naive, {}, []),
    (EWC, {"mode": "online"}, [plugins.EWC]),
    (LwF, {}, [plugins.LwF]),
    (LoRA, {"mode": "per_experience"}, [plugins.LoRA]),
    (OLoRA, {}, [plugins.OLoRA]),
    (Replay, {"buffer_size": 8}, [plugins.Replay]),
    (KNNLM, {"freeze_base": True}, [plugins.KNNLM]),
    (RetrievedExamples, {"freeze_base": True}, [plugins.RetrievedExamples]),
    (MetaKVConsolidation, {"buffer_size": 8}, [plugins.Replay, plugins.MetaKVConsolidation]),
    (MetaKVConsolidation, {"validation_fraction": 0.25},
     [plugins.Replay, plugins.MetaKVConsolidation, plugins.Validated]),
])
def test_presets_build_their_plugin_lists(preset, kwargs, expected, tmp_path):
    meta_kv = META_KV if preset is MetaKVConsolidation else None
    strategy, _ = make(tmp_path, [], strategy_cls=preset, meta_kv=meta_kv, **kwargs)
    assert [type(p) for p in strategy.method_plugins] == expected
    extra = plugins.EWC if preset is LwF else plugins.LwF
    extended, _ = make(tmp_path, [extra()], strategy_cls=preset, meta_kv=meta_kv, **kwargs)
    assert [type(p) for p in extended.method_plugins] == [*expected, extra]  # a preset's own plugins come first


class BatchExperiences:
    """Records the ``experience`` of every item of every training batch, per trained experience."""

    def __init__(self):
        self.seen: dict[int, list[int]] = {}

    def before_forward(self, strategy, **kwargs):
        index = int(strategy.experience.current_experience)
        self.seen.setdefault(index, []).extend(int(e) for e in strategy.mbatch["experience"])


def test_replay_and_ewc_compose_in_one_strategy(tmp_path):
    recorder = BatchExperiences()
    strategy, benchmark = make(tmp_path, [plugins.Replay(buffer_size=8), plugins.EWC(mode="online"), recorder])
    assert strategy.method_name == "replay+ewc-online"
    run_stream(strategy, benchmark)
    assert 0 in recorder.seen[1] and 1 in recorder.seen[1]  # replayed items train with the new ones
    assert len(strategy.plugin(plugins.Replay).memory) == 8
    assert len(strategy.plugin(plugins.EWC).importances) == 1 and "ewc" in strategy.module.penalties


def test_validated_schedule_holds_items_out_of_a_plain_fit(tmp_path):
    recorder = BatchExperiences()
    strategy, benchmark = make(tmp_path, [plugins.Validated(validation_fraction=0.25, patience=1), recorder],
                               num_experiences=1, epochs=2)
    strategy.train(benchmark.train_stream[0])
    items = len(benchmark.train_stream[0].dataset)
    trained_per_epoch = len(recorder.seen[0]) / strategy.clock.train_exp_epochs
    assert trained_per_epoch == items - round(0.25 * items)


@pytest.mark.parametrize("first, second, resource", [
    (lambda: plugins.Replay(8), lambda: plugins.Replay(16), "replay buffer"),
    (lambda: plugins.Replay(8), lambda: ReplayPlugin(mem_size=8), "replay buffer"),
    (lambda: plugins.EWC(), lambda: plugins.EWC(mode="online"), "EWC penalty"),
    (lambda: plugins.LoRA(), lambda: plugins.MetaKVConsolidation(), "peft adapters"),
    (lambda: plugins.LoRA(), lambda: plugins.OLoRA(), "peft adapters"),
    (lambda: plugins.OLoRA(), lambda: plugins.MetaKVConsolidation(), "peft adapters"),
    (lambda: plugins.OLoRA(), lambda: plugins.OLoRA(rank=4), "peft adapters"),
])
def test_conflicting_plugins_are_refused_naming_both(first, second, resource, tmp_path):
    a, b = first(), second()
    with pytest.raises(PluginConflictError, match=(
        rf"plugins\[0\] {type(a).__name__} and plugins\[1\] {type(b).__name__} both hold the {resource}"
    )):
        make(tmp_path, [a, b], meta_kv=META_KV)


def test_ewc_is_refused_next_to_meta_kv_consolidation(tmp_path):
    with pytest.raises(PluginConflictError, match=(
        r"plugins\[0\] MetaKVConsolidation and plugins\[1\] EWC cannot be combined: consolidation freezes"
    )):
        make(tmp_path, [plugins.MetaKVConsolidation(), plugins.EWC()], meta_kv=META_KV)


def test_a_saved_state_restores_only_into_the_same_plugins(tmp_path):
    saved, benchmark = make(tmp_path, [plugins.Replay(buffer_size=8), plugins.EWC()])
    saved.train(benchmark.train_stream[0])
    same, _ = make(tmp_path, [plugins.Replay(buffer_size=8), plugins.EWC()])
    same.load_state_dict(saved.state_dict())
    assert len(same.plugin(plugins.Replay).memory) == 8 and len(same.plugin(plugins.EWC).importances) == 1
    other, _ = make(tmp_path, [plugins.EWC(), plugins.Replay(buffer_size=8)])
    with pytest.raises(ValueError, match=r"holds the plugins \['Replay', 'EWC'\], this strategy has \['EWC', 'Replay'\]"):
        other.load_state_dict(saved.state_dict())


def test_resume_is_refused_when_an_avalanche_plugin_s_state_was_not_saved(tmp_path):
    saved, benchmark = make(tmp_path, [ReplayPlugin(mem_size=8)])
    state = saved.state_dict()
    assert state["unsaved_plugins"] == ["ReplayPlugin"] and saved.load_state_dict(state) is None  # nothing trained yet
    saved.train(benchmark.train_stream[0])
    resumed, _ = make(tmp_path, [ReplayPlugin(mem_size=8)])
    with pytest.raises(ValueError, match=r"cannot resume: the stream ran with Avalanche plugins whose state is not "
                                         r"saved \(ReplayPlugin\)"):
        resumed.load_state_dict(saved.state_dict())


class StopOnce:
    """Calls ``stop_training()`` at the first training iteration it sees, and counts the iterations."""

    def __init__(self):
        self.iterations = 0

    def before_training_iteration(self, strategy, **kwargs):
        self.iterations += 1
        if self.iterations == 1:
            strategy.stop_training()


def test_a_stop_ends_its_own_fit_not_the_next_phase(tmp_path):
    stopper = StopOnce()
    strategy, benchmark = make(tmp_path, [stopper], num_experiences=1, strategy_cls=MetaKVConsolidation,
                               meta_kv=META_KV, mode="distill")
    strategy.train(benchmark.train_stream[0])
    assert stopper.iterations > 1  # the consolidation phase trained after the fast phase was stopped


def test_a_classifier_plugin_is_refused_with_its_reason(tmp_path):
    with pytest.raises(UnsupportedPluginError, match=r"plugins\[0\] LwFPlugin cannot train a language model: .*class units"):
        make(tmp_path, [LwFPlugin()])


def test_composition_from_yaml_runs_through_the_cli(tmp_path, capsys):
    import json

    from metakv_cl.cli import main
    from metakv_cl.training.testing import toy_config, write_config

    strategy = {"class_path": "metakv_cl.strategies.ContinualStrategy", "init_args": {"plugins": [
        {"class_path": "metakv_cl.strategies.plugins.Replay", "init_args": {"buffer_size": 8}},
        {"class_path": "metakv_cl.strategies.plugins.EWC", "init_args": {"mode": "online"}},
    ]}}
    root = tmp_path / "run"
    main(["fit", "--config", write_config(tmp_path, toy_config(root, strategy))])
    report = json.loads((root / "report.json").read_text())
    assert [method["method"] for method in report["methods"]] == ["replay+ewc-online"]


# ---------------------------------------------------------------------------- Avalanche's contract


class ContractProbe:
    """Checks, at the events, that the strategy holds what Avalanche's SGD templates hold."""

    def __init__(self):
        self.checked = set()

    def before_forward(self, strategy, **kwargs):
        assert strategy.is_training and strategy.model is strategy.module
        assert isinstance(strategy.optimizer, torch.optim.Optimizer) and strategy.optimizer.param_groups
        assert isinstance(strategy.device, torch.device) and strategy.mb_x.device == strategy.device
        assert strategy.mb_x.dim() == 2 and strategy.mb_y.shape == strategy.mb_x.shape
        assert strategy.mb_task_id.tolist() == [0] * len(strategy.mb_x)
        assert strategy.experience is not None and len(strategy.adapted_dataset) > 0 and len(strategy.dataloader) > 0
        assert strategy.clock.train_exp_iterations >= 0
        self.checked.add("training")

    def before_backward(self, strategy, **kwargs):
        assert strategy.mb_output.shape[:2] == strategy.mb_x.shape and strategy.loss.requires_grad
        self.checked.add("loss")

    def after_eval_iteration(self, strategy, **kwargs):
        assert not strategy.is_training and math.isfinite(float(strategy.loss)) and len(strategy.mb_y) > 0
        self.checked.add("evaluation")


def test_the_strategy_holds_avalanches_state_at_every_event(tmp_path):
    probe = ContractProbe()
    strategy, benchmark = make(tmp_path, [probe], num_experiences=1)
    run_stream(strategy, benchmark)
    assert probe.checked == {"training", "loss", "evaluation"}


def test_avalanche_replay_plugin_puts_replayed_items_in_the_training_batches(tmp_path):
    recorder = BatchExperiences()
    strategy, benchmark = make(tmp_path, [ReplayPlugin(mem_size=8), recorder])
    for experience in benchmark.train_stream:
        strategy.train(experience)
    assert set(recorder.seen[0]) == {0}
    assert recorder.seen[1].count(0) > 0 and recorder.seen[1].count(1) == len(benchmark.train_stream[1].dataset)


def test_a_dataset_a_plugin_adapts_is_the_one_trained_on(tmp_path):
    class FirstFour:
        def after_train_dataset_adaptation(self, strategy, **kwargs):
            strategy.adapted_dataset = strategy.adapted_dataset.subset(range(4))

    recorder = BatchExperiences()
    strategy, benchmark = make(tmp_path, [FirstFour(), recorder], num_experiences=1, epochs=2)
    strategy.train(benchmark.train_stream[0])
    assert len(recorder.seen[0]) == 2 * 4


def test_a_plugins_dataloader_is_refused_under_ddp():
    from types import SimpleNamespace

    from metakv_cl.training.datamodule import GivenTrainingLoader

    datamodule = GivenTrainingLoader([{"input_ids": torch.ones(1, 2)}])
    datamodule.trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="replaced strategy.dataloader with list, which is not split across the 2 DDP"):
        datamodule.train_dataloader()


class LossProbe:
    """Placed before and after a plugin: the loss and its gradient as that plugin found and left them,
    and the gradient the step actually took."""

    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    def before_backward(self, strategy, **kwargs):
        parameters = [p for p in strategy.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(strategy.loss, parameters, retain_graph=True)
        self.log.append((self.tag, int(strategy.clock.train_exp_counter), float(strategy.loss.detach()), grads))

    def after_backward(self, strategy, **kwargs):
        if self.tag == "after":
            grads = [p.grad.clone() for p in strategy.model.parameters() if p.requires_grad]
            self.log.append(("stepped", int(strategy.clock.train_exp_counter), None, grads))


@torch.no_grad()
def copied_weights(model, target, excluded_parameters):
    """SI's ``extract_weights`` with a copy: Avalanche's ``param.detach().cpu().flatten()`` aliases the
    parameter on the CPU, so the optimiser's in-place step moves SI's anchor and snapshots with it and
    its term is 0 there whatever the strategy does (on a GPU ``.cpu()`` copies)."""
    for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
        target[name].data = param.detach().cpu().flatten().clone()


@pytest.mark.parametrize("make_plugin", [
    lambda: EWCPlugin(ewc_lambda=1e5),
    lambda: SynapticIntelligencePlugin(si_lambda=1e5),
], ids=["EWCPlugin", "SynapticIntelligencePlugin"])
def test_avalanche_penalty_plugins_change_the_trained_loss_and_gradient(make_plugin, tmp_path, monkeypatch):
    monkeypatch.setattr(SynapticIntelligencePlugin, "extract_weights", staticmethod(copied_weights))
    log = []
    strategy, benchmark = make(tmp_path, [LossProbe(log, "before"), make_plugin(), LossProbe(log, "after")])
    for experience in benchmark.train_stream:
        strategy.train(experience)
    steps = [log[i:i + 3] for i in range(0, len(log), 3)]
    for (_, experience, before, found), (_, _, after, left), (_, _, _, stepped) in steps:
        for got, want in zip(stepped, left):
            torch.testing.assert_close(got, want)  # the step trained the loss the plugin left
        if experience == 0:
            assert after == before  # nothing to protect yet
    changed = [(after - before, found, left) for (_, e, before, found), (_, _, after, left), _ in steps if e == 1]
    assert len(changed) > 1 and all(delta != 0 for delta, _, _ in changed[1:])  # the first step starts at the anchor
    assert any(not torch.allclose(a, b) for _, found, left in changed[1:] for a, b in zip(found, left))


def test_avalanche_early_stopping_stops_the_fit(tmp_path):
    evaluator = EvaluationPlugin(loss_metrics(stream=True), loggers=[])
    stopper = EarlyStoppingPlugin(patience=1, val_stream_name="test_stream", metric_name="Loss_Stream", mode="min")
    strategy, benchmark = make(tmp_path, [stopper], num_experiences=1, epochs=5, evaluator=evaluator)
    strategy.eval(benchmark.test_stream)  # the metric it watches (not improved by training epochs it cannot see)
    strategy.train(benchmark.train_stream[0])
    batches = -(-len(benchmark.train_stream[0].dataset) // 8)
    assert strategy.clock.train_exp_iterations == batches  # stopped before the second of five epochs


def test_avalanche_lr_scheduler_plugin_drives_the_fits_optimizer(tmp_path):
    class LearningRates:
        def __init__(self):
            self.rates = []

        def before_training_epoch(self, strategy, **kwargs):
            self.rates.append(strategy.optimizer.param_groups[0]["lr"])

    torch.manual_seed(0)
    benchmark, module = toy_setup(1)
    placeholder = torch.optim.SGD(module.parameters(), lr=module.lr)  # as Avalanche users build it
    rates = LearningRates()
    strategy = ContinualStrategy(
        module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path, max_epochs=3), train_mb_size=8,
        plugins=[LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(placeholder, step_size=1, gamma=0.1)), rates],
    )
    strategy.train(benchmark.train_stream[0])
    assert rates.rates == pytest.approx([module.lr, module.lr * 0.1, module.lr * 0.01])


def run_with_loggers(tmp_path, loggers):
    evaluator = EvaluationPlugin(
        ContinualMatrixPluginMetric(higher_is_better=False), loss_metrics(epoch=True, experience=True, stream=True),
        loggers=loggers,
    )
    strategy, benchmark = make(tmp_path / "run", [], evaluator=evaluator)
    run_stream(strategy, benchmark)


def test_avalanche_loggers_write_the_metrics(tmp_path):
    with open(tmp_path / "log.txt", "w") as text_file:
        run_with_loggers(tmp_path, [InteractiveLogger(), TextLogger(text_file), CSVLogger(str(tmp_path / "csv"))])
    text = (tmp_path / "log.txt").read_text()
    assert "CL_BWT/eval_phase/test_stream" in text and "Loss_Stream/eval_phase/test_stream" in text
    csv = (tmp_path / "csv" / "eval_results.csv").read_text().splitlines()
    assert len(csv) > 1 and all(math.isfinite(float(line.split(",")[3])) for line in csv[1:])
    assert len((tmp_path / "csv" / "training_results.csv").read_text().splitlines()) > 1


def test_avalanche_tensorboard_logger_writes_the_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorboardLogger needs the tensorboard package")
    from avalanche.logging import TensorboardLogger

    logger = TensorboardLogger(str(tmp_path / "tb"))
    run_with_loggers(tmp_path, [logger])
    logger.writer.flush()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and sum(event.stat().st_size for event in events) > 1000


@pytest.mark.parametrize("preset_name, plugin_name", [
    *((name, name) for name in ["EWC", "LwF", "LoRA", "OLoRA", "Replay", "MetaKVConsolidation", "KNNLM",
                                "RetrievedExamples"]),
    ("MetaKVAddressed", "BankSchedule"),
])
def test_a_preset_s_defaults_are_its_plugin_s(preset_name, plugin_name):
    """Presets take their plugin's arguments from its signature (jsonargparse reads signatures): same defaults."""
    import inspect

    from metakv_cl import strategies
    from metakv_cl.strategies import plugins as method_plugins

    preset = inspect.signature(getattr(strategies, preset_name).__init__).parameters
    plugin = inspect.signature(getattr(method_plugins, plugin_name).__init__).parameters
    shared = [key for key in plugin if key != "self" and key in preset]
    assert shared, "the preset takes none of its plugin's arguments"
    assert {key: preset[key].default for key in shared} == {key: plugin[key].default for key in shared}


def test_a_preset_s_arguments_carry_its_plugin_s_types_and_help():
    """jsonargparse (the CLI's help and type checks) reads a preset's plugin arguments as the plugin's."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    from metakv_cl import strategies

    parameters = {parameter.name: parameter for parameter in get_signature_parameters(strategies.EWC)}
    assert parameters["fisher_batches"].annotation == int | None
    assert parameters["decay_factor"].doc.startswith("online mode: how much of the old Fisher")
    assert parameters["train_mb_size"].doc == "training mini-batch size per process."  # the strategy's own
    consolidation = {parameter.name: parameter for parameter in get_signature_parameters(strategies.MetaKVAddressed)}
    assert consolidation["validation_fraction"].default == 0.0  # the preset's default, not Validated's
    assert "phases" not in consolidation
    assert {"slots_per_experience", "buffer_size", "temperature", "module"} <= set(consolidation)
