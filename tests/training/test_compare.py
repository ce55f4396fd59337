"""compare() from Python: one initial module per strategy (or one for all), each trained on a copy."""

import copy

import pytest
import torch

from metakv_cl.modeling import MetaKVConfig
from metakv_cl.strategies import Naive
from metakv_cl.training import ContinualLMModule, compare
from metakv_cl.training.testing import toy_setup, toy_trainer_kwargs


def test_each_strategy_trains_a_copy_of_its_own_module(tmp_path):
    benchmark, plain = toy_setup(1)
    meta_kv = ContinualLMModule(copy.deepcopy(plain.model), meta_kv=MetaKVConfig(rank=4), lr=1e-2)
    initial = copy.deepcopy(plain.state_dict())
    kwargs = toy_trainer_kwargs(tmp_path)
    results = compare(
        [lambda m: Naive(module=m, trainer_kwargs=kwargs), lambda m: Naive(module=m, trainer_kwargs=kwargs, name="meta")],
        [plain, meta_kv],
        benchmark,
        root_dir=tmp_path,
    )
    first, second = (result.extra for result in results)
    assert first["module"]["meta_kv"] is None and first["module"]["lr"] == 3e-3
    assert second["module"]["meta_kv"]["rank"] == 4 and second["module"]["lr"] == 1e-2
    assert second["trainable_params"] > first["trainable_params"] == sum(p.numel() for p in plain.parameters())
    assert all(torch.equal(value, initial[key]) for key, value in plain.state_dict().items())  # never trained


def test_a_list_of_modules_must_match_the_strategies(tmp_path):
    benchmark, module = toy_setup(1)
    with pytest.raises(ValueError, match="2 modules for 1 strategies"):
        compare([lambda m: Naive(module=m)], [module, module], benchmark, root_dir=tmp_path)
