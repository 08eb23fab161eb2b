"""Model names (the ones OCP used in ``config["model"]``) and how to build each model."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

#: name -> "module:class", imported on first use.
_MODELS = {
    "spinconv": "forcecalc.models.spinconv:SpinConv",
    "forcenet": "forcecalc.models.forcenet:ForceNet",
}


def model_names() -> list[str]:
    """The model names a checkpoint may carry."""
    return sorted(_MODELS)


def model_class(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class registered as ``name``."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r} (known: {', '.join(model_names())})")
    module, cls = _MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Construct model ``name`` from its keyword arguments (a clear error for unknown ones)."""
    cls = model_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"the {name} model has no option(s) {', '.join(unknown)}")
    return cls(**kwargs)
