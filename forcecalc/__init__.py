"""forcecalc: ForceNet and SpinConv force fields as ASE calculators."""

__version__ = "0.1.0"
