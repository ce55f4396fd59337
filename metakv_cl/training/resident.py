"""A single-device Lightning strategy that leaves the model on its device between Trainer calls.

A continual-learning stream runs many short ``Trainer.fit`` / ``Trainer.validate`` calls (one
per phase of every experience, one validation per experience after each). Lightning's
``Strategy.teardown`` moves the module and the optimiser states back to the CPU and empties the
CUDA cache at the end of every call, so the next call copies the whole model to the GPU again:
for a 135M-parameter model and a 7-experience stream that is about a hundred round trips of
half a gigabyte. This strategy skips those moves (the optimiser of a finished fit is dropped
instead of moved) and keeps the caching allocator's memory.

Use it by name: ``Trainer(accelerator="gpu", devices=1, strategy="single_device_resident")``
(importing :mod:`metakv_cl.training` registers it). Without an explicit device it runs on the
accelerator's current device (``cuda:<current>`` for GPUs, else the CPU).
"""

from __future__ import annotations

import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry

RESIDENT_STRATEGY_NAME = "single_device_resident"


class ResidentSingleDeviceStrategy(SingleDeviceStrategy):
    """``SingleDeviceStrategy`` whose teardown keeps the module on the device.

    Args:
        device: the device; default: the accelerator's current device.
        **kwargs: the other arguments of ``SingleDeviceStrategy``.
    """

    strategy_name = RESIDENT_STRATEGY_NAME

    def __init__(self, device: str | torch.device | None = None, **kwargs):
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        self._device_given = device is not None

    @property
    def root_device(self) -> torch.device:
        accelerator = self.accelerator
        if self._device_given or accelerator is None or isinstance(accelerator, CPUAccelerator):
            return super().root_device
        return torch.device("cuda", torch.cuda.current_device())

    def teardown(self) -> None:
        # Strategy.teardown minus moving the module and optimiser states to the CPU (and minus
        # the accelerator's cache clearing): the finished fit's optimiser is simply released.
        self.optimizers = []
        self.lr_scheduler_configs = []
        self.precision_plugin.teardown()
        self.checkpoint_io.teardown()


if RESIDENT_STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        RESIDENT_STRATEGY_NAME,
        ResidentSingleDeviceStrategy,
        description="single device; the model stays on the device between Trainer calls",
    )
