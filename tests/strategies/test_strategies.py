"""Every strategy runs a toy stream end to end and does what makes it that strategy."""

import math
import time

import pytest
import pytorch_lightning as pl
import torch

from metakv_cl.modeling import MetaKVConfig, meta_kv_parameters
from metakv_cl.strategies.base import lm_criterion
from metakv_cl.strategies import plugins
from metakv_cl.strategies import (
    EWC,
    STRATEGIES,
    JointTraining,
    LoRA,
    LwF,
    MetaKVConsolidation,
    Naive,
    Replay,
    strategy_class,
)
from metakv_cl.testing import tiny_llama
from metakv_cl.training import ContinualLMModule
from metakv_cl.training.runner import run_stream, warm_up
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs

META_KV = MetaKVConfig(source="consolidated", rank=4, state_dim=16)
ADDRESSED_META_KV = MetaKVConfig(source="addressed", memory_slots=4, rank=4, state_dim=16)
# consolidation into a rank-4 modulation needs more optimisation than a toy epoch gives
EXTRA_ARGS = {
    "replay": {"buffer_size": 8},
    "metakv": {"buffer_size": 8, "consolidation_lr": 1e-2, "consolidation_epochs": 3, "warmup": 4},
    "metakv-addressed": {"buffer_size": 8, "consolidation_lr": 1e-2, "consolidation_epochs": 3, "warmup": 4,
                         "slots_per_experience": 2},
    "metakv-distill": {"mode": "distill", "buffer_size": 8, "fast_lr": 1e-2, "fast_epochs": 2,
                       "consolidation_lr": 1e-2, "consolidation_epochs": 6, "warmup": 4},
}


def make(strategy_cls, tmp_path, num_experiences=2, epochs=1, meta_kv=None, callbacks=(), warmup=0, **kwargs):
    """A strategy on the toy stream; ``warmup`` > 0 pre-trains on one extra topic for that many epochs."""
    torch.manual_seed(0)
    benchmark, module = toy_setup(num_experiences, meta_kv=meta_kv, warmup_experiences=1 if warmup else 0)
    trainer_kwargs = toy_trainer_kwargs(tmp_path, max_epochs=epochs, callbacks=list(callbacks))
    if warmup:
        warm_up(module, benchmark, root_dir=tmp_path, epochs=warmup, trainer_kwargs=trainer_kwargs, train_mb_size=8)
    strategy = strategy_cls(module=module, trainer_kwargs=trainer_kwargs, train_mb_size=8, **kwargs)
    return strategy, benchmark


def run(strategy_cls, tmp_path, **kwargs):
    strategy, benchmark = make(strategy_cls, tmp_path, **kwargs)
    return strategy, run_stream(strategy, benchmark)


# retrieval-icl scores classification streams only (tests/strategies/test_retrieved_examples.py runs it end to end)
@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"retrieval-icl"}) + ["metakv-distill"])
def test_every_strategy_learns_each_experience_end_to_end(name, tmp_path):
    meta_kv = ADDRESSED_META_KV if name == "metakv-addressed" else META_KV if name.startswith("metakv") else None
    strategy, result = run(STRATEGIES[name.removesuffix("-distill")], tmp_path, meta_kv=meta_kv, **EXTRA_ARGS.get(name, {}))
    assert result.score_name == "loss" and result.experience_names == strategy.experience_names
    assert len(result.experience_names) == 2
    assert len(result.matrix) == 3 and all(len(row) == 2 and all(math.isfinite(v) for v in row) for row in result.matrix)
    # the loss of every experience dropped once the model was trained on it
    for i in (1, 2):
        assert result.matrix[i][i - 1] < result.matrix[0][i - 1] - 1e-3, (name, result.matrix)
    assert strategy.trained_experiences == 2
    assert set(strategy.eval_scores) == {0, 1}
    assert result.extra["trainable_params"] > 0 and result.extra["wall_time_s"] > 0
    # the Avalanche metric plugin (matrix + figures) saw the evaluations (joint training has no
    # row per experience in the plugin's eyes, so no BWT there)
    figure = "Average" if name == "joint" else "BWT"
    assert f"CL_{figure}/eval_phase/test_stream" in strategy.evaluator.get_last_metrics()


class RecordingPlugin:
    """An Avalanche plugin (duck-typed: Avalanche calls whatever before_/after_ methods exist)."""

    EVENTS = (
        "before_training_exp", "after_training_exp", "before_training_epoch", "after_training_epoch",
        "before_training_iteration", "before_forward", "after_forward", "before_backward", "after_backward",
        "before_update", "after_update", "after_training_iteration", "before_eval_exp", "after_eval_exp",
        "before_eval_iteration", "after_eval_iteration",
    )

    def __init__(self):
        self.counts = dict.fromkeys(self.EVENTS, 0)
        self.losses = []
        for event in self.EVENTS:
            setattr(self, event, self._recorder(event))

    def _recorder(self, event):
        def record(strategy, **kwargs):
            self.counts[event] += 1
            if event == "before_backward":
                self.losses.append(float(strategy.loss))
                assert strategy.mb_output.dim() == 3 and "input_ids" in strategy.mbatch
        return record


def test_avalanche_plugin_hooks_fire_from_lightning_loops(tmp_path):
    plugin = RecordingPlugin()
    strategy, benchmark = make(Naive, tmp_path, epochs=2, plugins=[plugin])
    run_stream(strategy, benchmark)
    batches = sum(math.ceil(len(e.dataset) / 8) for e in benchmark.train_stream) * 2  # 2 epochs
    counts = plugin.counts
    assert counts["before_training_exp"] == counts["after_training_exp"] == 2
    assert counts["before_training_epoch"] == counts["after_training_epoch"] == 4
    for event in ("before_training_iteration", "before_forward", "after_forward", "before_backward",
                  "after_backward", "before_update", "after_update", "after_training_iteration"):
        assert counts[event] == batches, event
    assert counts["before_eval_exp"] == counts["after_eval_exp"] == 3 * 2  # 3 rows x 2 experiences
    assert counts["before_eval_iteration"] == counts["after_eval_iteration"] > 0
    assert all(math.isfinite(loss) for loss in plugin.losses)


def test_training_throughput_counts_every_trained_token_once_per_epoch(tmp_path):
    strategy, benchmark = make(Naive, tmp_path, epochs=2)
    result = run_stream(strategy, benchmark)
    tokens = 2 * sum(len(item["input_ids"]) for e in benchmark.train_stream for item in e.dataset)
    assert result.extra["train_tokens"] == tokens  # padding left out
    assert 0 < result.extra["train_seconds"] < result.extra["wall_time_s"]  # evaluation left out
    assert result.extra["train_tokens_per_s"] == pytest.approx(tokens / result.extra["train_seconds"])
    # the totals survive a restart of the stream
    restored, _ = make(Naive, tmp_path / "restored")
    restored.load_state_dict(strategy.state_dict())
    assert restored.report_extra()["train_tokens"] == tokens


class SlowValidation(pl.Callback):
    """Sleeps at every validation inside a fit, so a clock that counts it cannot miss it."""

    SECONDS = 1.0  # well above the toy steps' own time, even on a busy machine

    def __init__(self):
        self.validations = 0

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.validations += 1
            time.sleep(self.SECONDS)


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])  # after each epoch; also mid-epoch
def test_training_throughput_leaves_validation_inside_a_fit_out(val_check_interval, tmp_path):
    slow = SlowValidation()
    strategy, benchmark = make(MetaKVConsolidation, tmp_path, num_experiences=1, meta_kv=META_KV, callbacks=[slow],
                               buffer_size=8, consolidation_epochs=2, validation_fraction=0.25, patience=5)
    strategy.trainer_kwargs["val_check_interval"] = val_check_interval
    run_stream(strategy, benchmark)
    assert slow.validations >= 2 / val_check_interval
    assert 0 < strategy.throughput.seconds < SlowValidation.SECONDS  # a few toy steps, no sleeping validation


def test_plugin_can_stop_training(tmp_path):
    class StopAfterTwo:
        def __init__(self):
            self.iterations = 0

        def after_training_iteration(self, strategy, **kwargs):
            self.iterations += 1
            if self.iterations == 2:
                strategy.stop_training()

    stopper = StopAfterTwo()
    strategy, benchmark = make(Naive, tmp_path, num_experiences=1, epochs=3, plugins=[stopper])
    strategy.train(benchmark.train_stream[0])
    assert stopper.iterations == 2
    # the throughput counter closes the stopped epoch: two batches' tokens, in some time
    one_epoch = sum(len(item["input_ids"]) for item in benchmark.train_stream[0].dataset)
    assert 0 < strategy.throughput.tokens < one_epoch and strategy.throughput.seconds > 0


def parameters(module):
    return {name: p.detach().clone() for name, p in module.model.named_parameters()}


def distance(a, b):
    return sum(float(((a[n] - b[n]) ** 2).sum()) for n in a) ** 0.5


@pytest.mark.parametrize("mode, expected_pairs", [("separate", 2), ("online", 1)])
def test_ewc_fisher_per_mode_and_anchor_holds_weights(mode, expected_pairs, tmp_path):
    ewc, benchmark = make(EWC, tmp_path / "ewc", mode=mode, ewc_lambda=1e6)
    naive, _ = make(Naive, tmp_path / "naive")
    moves = {}
    for name, strategy in (("ewc", ewc), ("naive", naive)):
        strategy.train(benchmark.train_stream[0])
        anchor = parameters(strategy.module)
        strategy.train(benchmark.train_stream[1])
        moves[name] = distance(parameters(strategy.module), anchor)
    importances = ewc.plugin(plugins.EWC).importances
    assert len(importances) == expected_pairs
    fisher = importances[-1][1]
    values = torch.cat([f.flatten() for f in fisher.values()])
    assert torch.isfinite(values).all() and (values >= 0).all() and values.max() > 0
    assert "ewc" in ewc.module.penalties
    assert moves["ewc"] < 0.5 * moves["naive"], moves


def test_ewc_penalty_and_its_gradient_are_the_textbook_sum(tmp_path):
    strategy, benchmark = make(EWC, tmp_path, mode="separate", ewc_lambda=3.0)
    ewc = strategy.plugin(plugins.EWC)
    module = strategy.module
    named = dict(module.model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    # two stored importances; the second anchored at the current weights (zero difference: no NaN gradient)
    moved = {n: p.detach() + torch.randn(p.shape, generator=generator) for n, p in named.items()}
    ewc.importances = [
        (moved, {n: torch.rand(p.shape, generator=generator) for n, p in named.items()}),
        ({n: p.detach().clone() for n, p in named.items()}, {n: torch.rand(p.shape, generator=generator) for n, p in named.items()}),
    ]
    penalty = ewc.penalty(module, {}, None)
    gradients = torch.autograd.grad(penalty, list(named.values()), retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(gradients, torch.autograd.grad(penalty, list(named.values()))))
    expected = 3.0 * sum((fisher[n] * (p - anchors[n]) ** 2).sum() for anchors, fisher in ewc.importances
                         for n, p in named.items())
    expected_gradients = torch.autograd.grad(expected, list(named.values()))
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(gradients, expected_gradients):
        assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_ewc_fisher_is_the_mean_squared_gradient_of_single_examples(architecture, tmp_path):
    torch.manual_seed(0)
    benchmark, module = toy_setup(1)
    if architecture == "llama":
        module = ContinualLMModule(tiny_llama(vocab_size=module.vocab_size))
    strategy = EWC(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path), train_mb_size=3, fisher_batches=2)
    dataset = benchmark.train_stream[0].dataset
    fisher = strategy.plugin(plugins.EWC).estimate_fisher(strategy, dataset)

    model, examples = module.model.eval(), 2 * 3  # fisher_batches x train_mb_size: the rest is left out
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for index in range(examples):
        item = dataset.collate_fn([dataset[index]])
        model.zero_grad()
        lm_criterion(model(input_ids=item["input_ids"]), item["labels"]).backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad**2 / examples
    assert fisher.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(fisher[name], value, rtol=1e-4, atol=1e-12), name


def test_ewc_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="unknown EWC mode 'offline'"):
        make(EWC, tmp_path, mode="offline")


def test_lora_trains_only_adapters(tmp_path):
    strategy, benchmark = make(LoRA, tmp_path, mode="shared")
    base_before = parameters(strategy.module)
    strategy.train(benchmark.train_stream[0])
    strategy.train(benchmark.train_stream[1])
    after = {n.replace("model.", "", 1): p for n, p in parameters(strategy.module).items()}
    lora = [n for n in after if "lora_" in n]
    assert lora and strategy.plugin(plugins.LoRA).adapters == ["shared"]
    for name, value in base_before.items():
        key = name if name in after else name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after[key], value), name


def test_lora_per_experience_routed_isolates_experiences(tmp_path):
    strategy, result = run(LoRA, tmp_path, mode="per_experience", route_by_experience=True)
    assert strategy.plugin(plugins.LoRA).adapters == ["exp_0", "exp_1"]
    assert strategy.method_name == "lora-per-experience-routed"
    # experience 0 is scored with its own frozen adapter: training experience 1 cannot touch it
    assert result.matrix[2][0] == pytest.approx(result.matrix[1][0], abs=1e-9)
    # and each adapter does carry its experience (trained alone, used alone)
    assert result.matrix[1][0] < result.matrix[0][0] - 1e-3 and result.matrix[2][1] < result.matrix[0][1] - 1e-3


def test_replay_buffer_respects_budget_and_mixes_old_items(tmp_path):
    strategy, benchmark = make(Replay, tmp_path, num_experiences=3, buffer_size=10)
    for k in range(3):
        strategy.train(benchmark.train_stream[k])
        experiences = [int(item["experience"]) for item in strategy.plugin(plugins.Replay).memory.dataset]
        assert len(experiences) == 10
        assert sorted(set(experiences)) == list(range(k + 1))  # balanced over the experiences seen
    assert len(strategy.adapted_dataset or []) == 0  # cleaned after training
    sizes = [len(benchmark.train_stream[2].dataset), len(strategy.plugin(plugins.Replay).memory)]
    strategy.experience = benchmark.train_stream[2]
    strategy.train_dataset_adaptation()
    assert len(strategy.adapted_dataset) == sum(sizes)


def test_lwf_keeps_the_previous_models_outputs_on_new_data(tmp_path):
    from metakv_cl.training.distillation import ParameterSnapshot, prediction_mask, token_kl

    drift = {}
    for name, cls, kwargs in (("lwf", LwF, {"alpha": 50.0}), ("naive", Naive, {})):
        strategy, benchmark = make(cls, tmp_path / name, epochs=2, **kwargs)
        strategy.train(benchmark.train_stream[0])
        previous = ParameterSnapshot(strategy.module.model)
        if name == "lwf":
            assert strategy.plugin(plugins.LwF).teacher is not None
        strategy.train(benchmark.train_stream[1])
        assert ("distillation" in strategy.module.penalties) == (name == "lwf")
        dataset = benchmark.train_stream[1].dataset
        batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
        model = strategy.module.model.eval()
        with torch.no_grad():
            now = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            before = previous.forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl, count = token_kl(now, before, prediction_mask(batch["labels"]))
        drift[name] = float(kl / count)
    assert drift["lwf"] < 0.5 * drift["naive"], drift


def test_joint_training_is_one_model_for_every_row(tmp_path):
    strategy, result = run(JointTraining, tmp_path)
    assert result.matrix[1] == result.matrix[2]
    assert result.summary["forgetting"] == pytest.approx(0.0) and result.summary["bwt"] == pytest.approx(0.0)


class PhaseWatcher(pl.Callback):
    """Records which parameters each phase of an experience changed."""

    def __init__(self):
        self.changed = []

    def on_train_start(self, trainer, pl_module):
        self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_end(self, trainer, pl_module):
        now = dict(pl_module.model.named_parameters())
        changed = {n for n, value in self.before.items() if not torch.equal(now[n].detach(), value)}
        self.changed.append((trainer.default_root_dir.rsplit("/", 1)[-1], changed))


def test_consolidating_m_alone_with_a_zero_generator_is_refused(tmp_path):
    # B(C) starts at zero: with the generator frozen the loss does not depend on M at all
    with pytest.raises(ValueError, match=r"consolidate_groups=\['memory'\] cannot learn: the generator's B is still zero"):
        make(MetaKVConsolidation, tmp_path, meta_kv=META_KV, consolidate_groups=["memory"], buffer_size=8)


@pytest.mark.parametrize("groups", [("memory",), ("memory", "generator")])
def test_consolidation_changes_only_the_consolidated_groups(groups, tmp_path):
    watcher = PhaseWatcher()
    strategy, benchmark = make(
        MetaKVConsolidation, tmp_path, meta_kv=META_KV, warmup=1, callbacks=[watcher],
        mode="distill", consolidate_groups=groups, buffer_size=8,
    )
    model = strategy.module.model
    memory = {n for n, p in model.named_parameters() if any(p is q for q in meta_kv_parameters(model, "memory"))}
    allowed = {n for n, p in model.named_parameters() if any(p is q for g in groups for q in meta_kv_parameters(model, g))}
    run_stream(strategy, benchmark)
    stream_fits = [(phase, changed) for phase, changed in watcher.changed if phase != "train"]  # not the warm-up
    assert [phase for phase, _ in stream_fits] == ["fast", "consolidate", "fast", "consolidate"]
    for phase, changed in stream_fits:
        if phase == "fast":
            assert changed and all("lora_" in n for n in changed), changed
        else:
            names = {n.replace("model.", "", 1) for n in changed}
            assert names & memory, "M did not change during consolidation"
            assert names <= allowed, names - allowed
    assert not any("lora_" in n for n, _ in strategy.module.model.named_parameters())  # fast weights reset
    # the reported count holds every parameter the experience trained: fast LoRA + consolidated groups
    consolidated = sum(p.numel() for g in groups for p in meta_kv_parameters(model, g))
    by_phase = strategy.report_extra()["trainable_params_by_phase"]
    assert by_phase["consolidate"] == consolidated and by_phase["fast"] > 0
    assert strategy.report_extra()["trainable_params"] == by_phase["fast"] + consolidated
    history = strategy.plugin(plugins.MetaKVConsolidation).memory_history
    assert len(history) == 2
    assert not torch.equal(next(iter(history[0].values())), next(iter(history[1].values())))
    assert (tmp_path / "memory_history.pt").is_file()


def test_metakv_needs_a_meta_kv_model(tmp_path):
    with pytest.raises(ValueError, match="needs a model with Meta-KV attention"):
        make(MetaKVConsolidation, tmp_path)


def test_metakv_mode_and_fast_weights_must_fit(tmp_path):
    with pytest.raises(ValueError, match="needs fast_weights='lora'"):
        make(MetaKVConsolidation, tmp_path, meta_kv=META_KV, mode="distill", fast_weights="none")
    with pytest.raises(ValueError, match="set fast_weights='none'"):
        make(MetaKVConsolidation, tmp_path, meta_kv=META_KV, mode="replay", fast_weights="lora")


def test_unknown_strategy_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown strategy 'sgd'.*ewc.*naive"):
        strategy_class("sgd")


def test_empty_training_experience_is_refused(tmp_path):
    from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience

    strategy, benchmark = make(Naive, tmp_path)
    empty = DatasetExperience(dataset=benchmark.train_stream[0].dataset.subset([]), current_experience=0)
    strategy.experience_names = benchmark.experience_names
    with pytest.raises(ValueError, match=r"experience 0 \('people'\).*empty"):
        strategy.train(empty, eval_streams=[])


def test_classification_stream_is_scored_by_accuracy(tmp_path):
    from metakv_cl.data import ClassificationTask, make_benchmark, word_level_tokenizer
    from metakv_cl.testing import tiny_gpt2
    from metakv_cl.training.module import ContinualLMModule

    def task(name, words):
        pairs = [(f"{word} {i}", label) for i in range(6) for word, label in words]
        return ClassificationTask(name, train=pairs, test=pairs[:4], labels=sorted({label for _, label in words}))

    tasks = [task("sentiment", [("great", "good"), ("awful", "bad")]), task("size", [("tiny", "small"), ("huge", "large")])]
    texts = [t.prompt(x) + " " + y for t in tasks for x, y in t.train] + [str(i) for i in range(6)]
    tokenizer = word_level_tokenizer(texts)
    benchmark = make_benchmark(tasks, tokenizer, max_length=16)
    torch.manual_seed(0)
    module = ContinualLMModule(tiny_gpt2(vocab_size=len(tokenizer)), lr=1e-2)
    strategy = Naive(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path, max_epochs=20), train_mb_size=4,
                     eval_mb_size=3)
    result = run_stream(strategy, benchmark)
    assert result.score_name == "accuracy" and strategy.matrix_metric.higher_is_better
    # the per-item outcomes of every evaluation give back each cell of R
    assert result.items["gold"] == [[1, 0, 1, 0], [1, 0, 1, 0]] and result.items["num_choices"] == [2, 2]
    for row, predicted in zip(result.matrix, result.items["predicted"]):
        assert row == [sum(p == g for p, g in zip(task, gold)) / 4 for task, gold in zip(predicted, result.items["gold"])]
    rows = result.task_rows()
    assert [row["majority_rate"] for row in rows] == [0.5, 0.5]
    assert [row["did_not_learn"] for row in rows] == [value <= 0.5 for value in result.matrix[2]]
    assert all(0.0 <= value <= 1.0 for row in result.matrix for value in row)
    assert result.matrix[1][0] == 1.0, result.matrix  # the first task is learned...
    assert result.matrix[2][0] < 1.0  # ...and forgotten by naive fine-tuning on the second
    # accuracies are oriented upward: forgetting = best earlier accuracy - final accuracy > 0
    assert result.summary["forgetting"] == pytest.approx(result.matrix[1][0] - result.matrix[2][0])
    assert set(strategy.eval_results[0]) >= {"accuracy", "loss"}


class ValidationRecorder(pl.Callback):
    """The in-fit validation losses of every fit."""

    def __init__(self):
        self.losses: list[list[float]] = []

    def on_fit_start(self, trainer, pl_module):
        self.losses.append([])

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.losses[-1].append(float(trainer.callback_metrics["eval/loss"]))


def test_validated_consolidation_stops_early_on_its_best_epoch(tmp_path):
    recorder = ValidationRecorder()
    strategy, benchmark = make(
        MetaKVConsolidation, tmp_path, meta_kv=META_KV, warmup=1, callbacks=[recorder], buffer_size=8,
        consolidation_lr=0.3, consolidation_epochs=8, validation_fraction=0.25, patience=1,  # lr 0.3 overfits fast
    )
    report = run_stream(strategy, benchmark)
    validated = [losses for losses in recorder.losses if losses]
    assert len(validated) == 2  # one consolidation per experience; the warm-up fit has no validation
    epochs = strategy.plugin(plugins.MetaKVConsolidation).consolidation_epochs_used
    assert report.extra["consolidation_epochs_per_experience"] == epochs
    for losses, used in zip(validated, epochs):
        best = min(range(len(losses)), key=losses.__getitem__)
        assert used == best + 1
        assert len(losses) == 8 or len(losses) == best + 2  # stopped one epoch (patience 1) after the best
    assert any(len(losses) < 8 for losses in validated), validated


def test_best_weights_restores_the_best_epoch(tmp_path):
    from metakv_cl.training.callbacks import BestWeights

    class Climb(pl.LightningModule):
        """w grows by 1 per epoch; the validation loss (w - 2)^2 is best after the second epoch."""

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return -self.model.w

        def validation_step(self, batch, batch_idx):
            self.log("eval/loss", (self.model.w.detach() - 2) ** 2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

        def train_dataloader(self):
            return torch.utils.data.DataLoader([0])

        def val_dataloader(self):
            return torch.utils.data.DataLoader([0])

    module, best = Climb(), BestWeights("eval/loss", ["w"])
    trainer = pl.Trainer(max_epochs=5, callbacks=[best], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    assert best.best_epoch == 1 and module.model.w.item() == 2.0
    with pytest.raises(ValueError, match="mode"):
        BestWeights("eval/loss", ["w"], mode="lowest")


def test_validation_fraction_is_checked(tmp_path):
    with pytest.raises(ValueError, match="validation_fraction"):
        make(MetaKVConsolidation, tmp_path, meta_kv=META_KV, validation_fraction=1.0)


def test_logged_steps_run_on_across_fits_and_a_restart(tmp_path):
    import csv

    from pytorch_lightning.loggers import CSVLogger

    benchmark, module = toy_setup(2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    logger = CSVLogger(str(tmp_path), name="logs", version="naive")
    kwargs = toy_trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=False, logger=logger, log_every_n_steps=1)
    strategy = Naive(module=module, trainer_kwargs=kwargs, train_mb_size=8)
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[])
    logger.save()
    with open(tmp_path / "logs" / "naive" / "metrics.csv") as file:
        steps = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    # two fits of 2 epochs: one stream of steps, each logged once, none drawn over another fit's
    assert len(steps) > 2 and steps == list(range(strategy.log_steps.logged_steps))
    restarted = Naive(module=module, trainer_kwargs=kwargs, train_mb_size=8)
    restarted.load_state_dict(strategy.state_dict())
    assert restarted.log_steps.logged_steps == len(steps)  # a resumed stream logs on from there
