"""Which of SpinConv's products can be TF32 within the fixture tolerances, emulated on the CPU.

A TF32 tensor-core product multiplies its float32 inputs cut to 10 mantissa bits and adds in
float32.  This script reproduces that in SpinConv's float32 PyTorch forward on the CPU: the
inputs of the chosen products are rounded (to the nearest TF32 number, as cuBLAS and
``tf32_rounded`` do, or truncated, as Triton's ``tf32`` does) before the product, and the
fixture structures' energies and forces are compared with the original's float64 outputs as
``tf32_error.py`` does (the same tolerances).  The products, by what the fused kernels
(``forcecalc/models/triton_kernels.py``) compute:

* ``linear``: the mixtures' input and output layers and the message blocks' distance term;
* ``mix_message``, ``mix_force``, ``mix_energy``: the experts' products of the mixtures of the
  message blocks (and the first embedding), of the force block and of the energy block;
* ``spectra``: the grids' spectra (the splat weights' product with the gathered values);
* ``products``: the spin convolutions' frequency products.

The products' factors are rounded (not a linear layer's bias, nor the mixtures' weighted sum of
the experts, which the kernels add in float32).  The fused kernels factor some products
differently (the spectra, the frequency products), yet every product truncated emulates 27.3
(energy) / 5.3 (forces) times the tolerances for SpinConv-All against 27.4 / 5.3 measured with
Triton's ``tf32`` on an H100 (``tf32_error.py --triton``).  Prints a table, writes JSON.

    python benchmarks/tf32_emulate.py --models spinconv_all spinconv_small_fc
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tf32_error import ROOT, checkpoint, errors
from torch import nn
from torch.overrides import TorchFunctionMode

from forcecalc.atomic import write_json
from forcecalc.checkpoint import load_checkpoint
from forcecalc.models import spinconv

CATEGORIES = ("linear", "mix_message", "mix_force", "mix_energy", "spectra", "products")
#: What ``with_triton_kernels(model, "mixed")`` computes with one TF32 product.
MIXED = ("mix_message", "mix_force", "products")


def tf32(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """``x`` with 10 mantissa bits: rounded to nearest (ties away) or truncated."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    if rounding == "nearest":
        bits = bits + 0x1000
    return (bits & -8192).view(torch.float32)


class EmulatedTF32(TorchFunctionMode):
    """Rounds the inputs of the products of ``categories`` (see the module docstring) while
    the module stack, kept by :meth:`hook`, says which product a call is."""

    def __init__(self) -> None:
        super().__init__()
        self.rounding: str | None = None
        self.categories: set[str] = set()
        self.stack: list[str] = []

    def hook(self, model: nn.Module) -> None:
        """Mark the modules whose products are categories of the module docstring."""

        def around(module: nn.Module, category: str) -> None:
            def enter(*_: Any) -> None:
                self.stack.append(category)

            def leave(*_: Any) -> None:
                self.stack.pop()

            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)

        for name, module in model.named_modules():
            if isinstance(module, spinconv.EmbeddingBlock):
                kind = "mix_energy" if "energy" in name else "mix_message"
                kind = "mix_force" if "force" in name else kind
                around(module, "mixing")  # the experts' weighted sum: float32 in the kernels
                around(module.fc1, "linear")
                around(module.fc2, kind)
                around(module.fc3, "linear")
            elif isinstance(module, spinconv.MessageBlock):
                around(module.distfc1, "linear")
                around(module.distfc2, "linear")
                around(module, "grids")
            elif isinstance(module, spinconv.ForceOutputBlock):
                around(module, "grids")
            elif isinstance(module, spinconv.SpinConvBlock):
                around(module, "products")

    def category(self, func: Callable) -> str | None:
        top = self.stack[-1] if self.stack else None
        if func is F.linear and top in CATEGORIES:
            return top
        if func in (torch.matmul, torch.Tensor.__matmul__) and top == "products":
            return "products"
        if func is torch.bmm and top == "grids":  # the spectra (the mixing bmm is in a block)
            return "spectra"
        return None

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.rounding and self.category(func) in self.categories:
            # the two factors (a linear layer's bias is added in float32)
            args = tuple(tf32(a, self.rounding) for a in args[:2]) + tuple(args[2:])
        return func(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["spinconv_all", "spinconv_small_fc"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/tf32_emulate.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ase.io import read

    data = ROOT / "tests" / "data" / "ocp"
    reference = json.loads((data / "reference.json").read_text())
    structures = {a.info["name"]: a for a in read(data / "structures.extxyz", index=":")}
    runs = [(None, ())]
    runs += [(rounding, (c,)) for rounding in ("nearest", "truncated") for c in CATEGORIES]
    runs += [("nearest", MIXED), ("nearest", (*MIXED, "spectra")), ("truncated", MIXED)]
    runs += [("truncated", CATEGORIES)]
    rows = []
    print(
        f"{'model':<20}{'rounding':<11}{'products':<34}{'dE/eV':>10}{'/tol':>7}{'dF':>10}{'/tol':>7}"
    )
    for name in args.models:
        path, model = checkpoint(name), reference["models"].get(name)
        if path is None or model is None or model["kind"] != "spinconv":
            print(f"{name:<20}(no SpinConv fixture checkpoint of that name: skipped)")
            continue
        rotations = torch.tensor(model["rotations"], dtype=torch.float64)
        potential = load_checkpoint(path, device="cpu", dtype="float32", rotations=rotations)
        mode = EmulatedTF32()
        mode.hook(potential.model)
        with mode:
            for rounding, categories in runs:
                mode.rounding, mode.categories = rounding, set(categories)
                row = {
                    "model": name,
                    "rounding": rounding or "none",
                    "products": list(categories),
                    **errors(potential, structures, model["results"], "cpu"),
                }
                rows.append(row)
                print(
                    f"{name:<20}{row['rounding']:<11}{'+'.join(categories) or '-':<34}"
                    f"{row['max_energy_error_eV']:>10.2e}{row['energy_error_over_tolerance']:>7.2f}"
                    f"{row['max_force_error_relative']:>10.2e}"
                    f"{row['force_error_over_tolerance']:>7.2f}",
                    flush=True,
                )
    write_json(args.out, {"benchmark": "tf32_emulate", "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
