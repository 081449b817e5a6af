"""Learning-rate schedulers whose checkpoints load with ``torch.load(weights_only=True)``.

Nerfstudio 1.1.5's :class:`ExponentialDecayScheduler` computes the learning rate with
NumPy, so optimiser and scheduler states in its checkpoints hold ``numpy.float64``
values. PyTorch >= 2.6 loads checkpoints with ``weights_only=True`` by default and
refuses NumPy scalars, so ``ns-viewer``/``ns-eval``/resuming fail on such checkpoints
("Unsupported global: numpy.core.multiarray.scalar"). This scheduler is the same
schedule returning Python floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Type

from nerfstudio.engine.schedulers import ExponentialDecayScheduler, ExponentialDecaySchedulerConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["FloatExponentialDecaySchedulerConfig", "FloatExponentialDecayScheduler"]


@dataclass
class FloatExponentialDecaySchedulerConfig(ExponentialDecaySchedulerConfig):
    """Nerfstudio's exponential decay (with warmup), storing plain floats so checkpoints load with weights_only."""

    _target: Type = field(default_factory=lambda: FloatExponentialDecayScheduler)


class FloatExponentialDecayScheduler(ExponentialDecayScheduler):
    """:class:`ExponentialDecayScheduler` whose learning rates are Python floats."""

    config: FloatExponentialDecaySchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> LRScheduler:
        scheduler = super().get_scheduler(optimizer, lr_init)
        numpy_lambdas = list(scheduler.lr_lambdas)
        scheduler.lr_lambdas = [lambda step, f=f: float(f(step)) for f in numpy_lambdas]
        # LambdaLR already applied the (NumPy) initial factor in its constructor.
        for group in optimizer.param_groups:
            group["lr"] = float(group["lr"])
        scheduler._last_lr = [float(lr) for lr in scheduler._last_lr]
        return scheduler
