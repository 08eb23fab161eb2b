"""Optimizer, learning-rate schedule, exponential moving average and parameter freezing."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def freeze_except(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Freeze every parameter not under one of the module names ``trainable``.

    A name selects a module and everything below it (``"force_output_block"`` selects
    ``force_output_block.block1.fc1.weight``).  An empty ``trainable`` keeps every parameter
    trainable.  Parameters that were already frozen (fixed tables) stay frozen.

    Returns:
        The names of the parameters left trainable.

    Raises:
        ValueError: a name selects no parameter (the message lists the model's top modules).
    """
    if not trainable:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in model.named_parameters()]
    for prefix in trainable:
        if not any(_under(n, prefix) for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise ValueError(
                f"--freeze-except {prefix!r} selects no parameter of the model; its modules: "
                f"{', '.join(top)}"
            )
    kept = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and any(_under(name, p) for p in trainable):
            kept.append(name)
        else:
            parameter.requires_grad_(False)
    return kept


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def all_norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every normalisation layer with running statistics (batch norms)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def frozen_norm_layers(model: nn.Module) -> list[nn.Module]:
    """Normalisation layers with running statistics and no trainable parameter.

    They are kept in eval mode during training, so that a frozen block's running statistics
    stay frozen too.
    """
    return [m for m in all_norm_layers(model) if not any(p.requires_grad for p in m.parameters())]


def build_optimizer(
    parameters: Sequence[nn.Parameter],
    name: str,
    lr: float,
    amsgrad: bool,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """Adam (L2 weight decay) or AdamW (decoupled weight decay) over ``parameters``."""
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(list(parameters), lr=lr, amsgrad=amsgrad, weight_decay=weight_decay, foreach=True)


class LRSchedule:
    """Linear warmup, then a plateau, cosine or constant schedule; sets the optimizer's rate.

    The learning rate at step ``t`` (counted from 0) is ``lr * warmup(t) * shape(t)``:

    * ``warmup(t)`` rises linearly from ``warmup_factor`` at ``t = 0`` to 1 at
      ``t = warmup_steps`` (OCP's ``warmup_lr_lambda``);
    * ``plateau``: ``shape`` is multiplied by ``factor`` (0.8: the SpinConv paper) when the
      monitored metric has not improved by a relative ``1e-4`` for more than ``patience``
      reports (as ``torch.optim.lr_scheduler.ReduceLROnPlateau``), never below ``min_lr``;
    * ``cosine``: half a cosine from ``lr`` after warmup to ``min_lr`` at ``total_steps``
      (constant when ``min_lr >= lr``: the rate never rises above ``lr``);
    * ``constant``: 1.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str,
        lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_factor: float = 0.2,
        min_lr: float = 0.0,
        factor: float = 0.8,
        patience: int = 3,
        threshold: float = 1e-4,
    ) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.lr = lr
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = warmup_steps
        self.warmup_factor = warmup_factor
        self.min_lr = min_lr
        self.factor = factor
        self.patience = patience
        self.threshold = threshold
        self.scale = 1.0
        self.best = math.inf
        self.bad_reports = 0

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step``."""
        warm = 1.0
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            warm = self.warmup_factor * (1.0 - alpha) + alpha
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
            low = min(self.min_lr, self.lr)  # a min_lr above lr never raises the rate
            lr = low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * progress))
            return lr * warm
        lr = self.lr * warm
        if self.kind == "plateau":
            lr = max(lr * self.scale, min(self.min_lr, lr))
        return lr

    def apply(self, step: int) -> float:
        """Set the optimizer's learning rate for step ``step``; returns it."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def report(self, metric: float) -> None:
        """A new value of the monitored metric (lower is better); plateau only."""
        if self.kind != "plateau":
            return
        if metric < self.best * (1.0 - self.threshold):
            self.best = metric
            self.bad_reports = 0
            return
        self.bad_reports += 1
        if self.bad_reports > self.patience:
            self.scale *= self.factor
            self.bad_reports = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "bad_reports": self.bad_reports}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.best = float(state["best"])
        self.bad_reports = int(state["bad_reports"])


class EMA:
    """Exponential moving average of the trainable parameters.

    After each optimizer step ``shadow = d * shadow + (1 - d) * parameter`` with
    ``d = min(decay, (1 + n) / (10 + n))`` where ``n`` counts the updates including this one
    (the warm-up of ``torch_ema`` with ``use_num_updates``: the first update uses ``2 / 11``;
    OCP's trainer averages with the constant ``decay`` from its first step, so its average
    keeps the initial weights longer).
    """

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float) -> None:
        self.parameters = list(parameters)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1.0 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the averages; restored afterwards."""
        saved = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for p, s in zip(self.parameters, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.parameters, saved, strict=True):
                    p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        shadow: list[Tensor] = state["shadow"]
        if len(shadow) != len(self.shadow):
            raise ValueError("the saved moving average has a different number of parameters")
        for own, saved in zip(self.shadow, shadow, strict=True):
            own.copy_(saved)
