"""forcecalc: ForceNet and SpinConv force fields (Open Catalyst Project) as ASE calculators."""

__version__ = "0.1.0"

from forcecalc.calculator import (
    ForceCalculator,
    ForceNetCalculator,
    SpinConvCalculator,
    load_calculator,
)
from forcecalc.checkpoint import load_checkpoint, save_checkpoint
from forcecalc.hub import list_models
from forcecalc.predict import predict
from forcecalc.relax import md, relax
from forcecalc.warning import ForcecalcWarning

__all__ = [
    "ForceCalculator",
    "ForceNetCalculator",
    "ForcecalcWarning",
    "SpinConvCalculator",
    "__version__",
    "list_models",
    "load_calculator",
    "load_checkpoint",
    "md",
    "predict",
    "relax",
    "save_checkpoint",
]
