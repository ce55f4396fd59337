"""O-LoRA (Wang et al. 2023): one adapter per experience, pushed orthogonal to the frozen earlier ones."""

import copy

import pytest
import torch

from metakv_cl.strategies import OLoRA, plugins
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs


def make(tmp_path, **kwargs):
    torch.manual_seed(0)
    benchmark, module = toy_setup(2)
    strategy = OLoRA(module=module, trainer_kwargs=toy_trainer_kwargs(tmp_path), train_mb_size=8, **kwargs)
    return strategy, benchmark


def adapter_parameters(model, adapter: str) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if f".{adapter}." in name}


def test_orthogonality_is_zero_between_orthogonal_subspaces_and_trains_only_the_new_adapter(tmp_path):
    strategy, _ = make(tmp_path, lambda_orth=0.5)
    olora = strategy.plugin(plugins.OLoRA)
    olora.add_adapter("exp_0")
    olora.add_adapter("exp_1")
    model = strategy.module.model
    layers = olora.adapted_layers(model)
    assert layers
    with torch.no_grad():  # exp_0 reads the first `rank` input directions, exp_1 the next ones
        for layer in layers:
            basis = torch.eye(layer.lora_A["exp_0"].weight.shape[1])
            layer.lora_A["exp_0"].weight.copy_(basis[: olora.rank])
            layer.lora_A["exp_1"].weight.copy_(basis[olora.rank : 2 * olora.rank])
    assert olora.orthogonality(model).item() == 0

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # exp_1 in a random subspace: it overlaps exp_0's
        for layer in layers:
            weight = layer.lora_A["exp_1"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
    expected = sum((layer.lora_A["exp_0"].weight @ layer.lora_A["exp_1"].weight.T).abs().sum() for layer in layers)
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # even so, the term moves the new adapter only
    term = olora.orthogonality(model)
    assert term.item() == pytest.approx(expected.item(), rel=1e-5) and term.item() > 0
    assert olora.penalty(strategy.module, {}, None).item() == pytest.approx(0.5 * term.item())
    term.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())}
    assert reached == {name for name in adapter_parameters(model, "exp_1") if "lora_A" in name}


def test_l2_term_is_the_new_adapter_s_squared_norm(tmp_path):
    strategy, _ = make(tmp_path, lambda_orth=0.0, lambda_l2=0.1)
    olora = strategy.plugin(plugins.OLoRA)
    olora.add_adapter("exp_0")
    olora.add_adapter("exp_1")
    newest = adapter_parameters(strategy.module.model, "exp_1").values()
    expected = 0.1 * sum(float(p.detach().square().sum()) for p in newest)
    assert expected > 0 and olora.penalty(strategy.module, {}, None).item() == pytest.approx(expected, rel=1e-5)


def test_earlier_adapters_stay_fixed_and_the_model_is_base_plus_every_delta(tmp_path):
    strategy, benchmark = make(tmp_path)
    strategy.train(benchmark.train_stream[0])
    model = strategy.module.model
    first = {name: p.detach().clone() for name, p in adapter_parameters(model, "exp_0").items()}
    strategy.train(benchmark.train_stream[1])
    assert strategy.plugin(plugins.OLoRA).adapters == ["exp_0", "exp_1"] and "olora" in strategy.module.penalties
    assert all(torch.equal(p, first[name]) for name, p in adapter_parameters(model, "exp_0").items())
    newest = adapter_parameters(model, "exp_1")
    assert any(bool(p.any()) for name, p in newest.items() if "lora_B" in name)  # the new adapter trained
    assert strategy.report_extra()["trainable_params"] == sum(p.numel() for p in newest.values())  # one adapter

    dataset = benchmark.test_stream[0].dataset
    batch = dataset.collate_fn([dataset[index] for index in range(4)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    newest_only = copy.deepcopy(model)
    newest_only.set_adapter(["exp_1"])
    with torch.no_grad():
        logits = model(**inputs).logits
        merged = copy.deepcopy(model).merge_and_unload()(**inputs).logits  # base weights + both deltas
        base = copy.deepcopy(model).unload()(**inputs).logits
        without_first = newest_only(**inputs).logits
    assert torch.allclose(logits, merged, atol=1e-5)
    assert (logits - base).abs().max() > 1e-3 and (logits - without_first).abs().max() > 1e-3


def test_training_lowers_the_overlap_with_earlier_adapters(tmp_path):
    overlap = {}
    for lambda_orth in (0.0, 0.5):
        strategy, benchmark = make(tmp_path / str(lambda_orth), lambda_orth=lambda_orth)
        for experience in benchmark.train_stream:
            strategy.train(experience)
        overlap[lambda_orth] = strategy.plugin(plugins.OLoRA).orthogonality(strategy.module.model).item()
    assert overlap[0.5] < 0.8 * overlap[0.0], overlap


def test_bad_settings_are_refused_naming_them(tmp_path):
    with pytest.raises(ValueError, match="lambda_orth must be a finite number >= 0, got -1"):
        plugins.OLoRA(lambda_orth=-1)
    with pytest.raises(ValueError, match="lambda_l2 must be a finite number >= 0, got nan"):
        plugins.OLoRA(lambda_l2=float("nan"))
    strategy, benchmark = make(tmp_path, target_modules=["wte", "c_attn"])
    with pytest.raises(ValueError, match=r"OLoRA target_modules: \S*wte is an embedding"):
        strategy.train(benchmark.train_stream[0])
