"""The fused Triton kernels (``forcecalc/models/triton_kernels.py``) against SpinConv's PyTorch
operators, kernel by kernel, at SpinConv-All's sizes on a CUDA device; with several tile
choices, to pick the module's defaults.

For a batch of ``--grids`` grids (16 x 66-atom slabs x 40 neighbors = 42,240 message-block
grids; hidden 32, mid 256, 16 x 12 grid, 40 values per grid) it times, with
``triton.testing.do_bench`` (median of repeated calls):

* the mixture of experts ``EmbeddingBlock(256, 256, 256)``: PyTorch (``fc1``, Swish, ``fc2``
  product, Swish, ``bmm`` mixing, ``fc3``) against the fused kernels (``linear`` with Swish,
  ``mixture_of_experts``, ``linear``);
* the spin convolution of a message block: PyTorch (splat weights kept, as on a GPU; the
  spectra ``bmm``, the frequency products, inverse DFT, Swish, mean, GroupNorm) against the
  fused spectra and pool kernels (the GroupNorm in the pooling kernel's pass);

each with its largest difference to the PyTorch output relative to that output's largest
value, for each ``tl.dot`` precision and tile choice.  Prints a table, writes JSON.

    python benchmarks/fused_kernels.py --out benchmarks/results/fused_kernels_cuda.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from forcecalc.atomic import write_json
from forcecalc.graph.gather import RowIndex
from forcecalc.models import triton_kernels
from forcecalc.models.spinconv import (
    EmbeddingBlock,
    SphereProjections,
    SpinConvBlock,
    splat_factors,
)

#: Tile choices: the module's defaults first, then alternatives (module constant -> value).
VARIANTS = [
    {},
    {"MIXTURE_STAGES": 3, "SPECTRA_STAGES": 3, "PRODUCTS_STAGES": 3},
    {
        "MIXTURE_TILES": (128, 64, 32),
        "SPECTRA_WARPS": 8,
        "PRODUCTS_TILES": (32, 128, 32),
        "LINEAR_TILES": (128, 64, 32),
        "LINEAR_WARPS": 8,
    },
    {"MIXTURE_WARPS": 4, "SPECTRA_GRIDS": 2, "PRODUCTS_TILES": (64, 128, 32)},
    {"PRODUCTS_TILES": (128, 128, 32), "INVERSE_COLUMNS": 256},
]


def milliseconds(call: Callable[[], object], cuda: bool) -> float:
    """Median milliseconds of ``call``: on CUDA by ``triton.testing.do_bench``; on the CPU
    (Triton's interpreter: a smoke test of this script, not a figure) one timed call."""
    if not cuda:
        start = time.perf_counter()
        call()
        return 1000 * (time.perf_counter() - start)
    from triton.testing import do_bench

    return float(do_bench(call, warmup=10, rep=100, return_mode="median"))


def relative(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).abs().max() / reference.abs().max())


def inputs(n: int, width: int, device: str) -> dict:
    """Random SpinConv-All-sized inputs of both kernels' blocks (seeded)."""
    torch.manual_seed(0)
    channels, mid, lat, long = 32, 256, 16, 12
    mixture = EmbeddingBlock(mid, mid, mid, 32, 90).to(device).eval()
    spin = SpinConvBlock(channels, mid, lat, long).to(device).eval()
    with torch.no_grad():
        spin.conv1.bias.normal_(0.0, 0.1)
    index = torch.randint(0, n + 1, (n, width), device=device)  # about 1 in n readers pads
    directions = torch.nn.functional.normalize(
        torch.randn(n, width, 3, dtype=torch.float64, device=device), dim=-1
    )
    longitude, latitude = splat_factors(directions, index < n, lat, long, torch.float32)
    return {
        "mixture": mixture,
        "spin": spin,
        "x": torch.randn(n, mid, device=device),
        "elements": torch.randint(1, 90, (n,), device=device),
        "values": torch.randn(n, channels, device=device),
        "projections": SphereProjections(RowIndex(index, n), longitude, latitude),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grids", type=int, default=16 * 66 * 40)
    parser.add_argument("--width", type=int, default=40)
    parser.add_argument("--precisions", nargs="+", default=["tf32x3", "tf32"])
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a smoke test of this script in Triton's interpreter (TRITON_INTERPRET=1, "
        "use a few hundred --grids)",
    )
    parser.add_argument("--out", default="benchmarks/results/fused_kernels_cuda.json")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("no CUDA device is visible (--device cpu: a smoke test in the interpreter)")
    data = inputs(args.grids, args.width, args.device)
    mixture, spin = data["mixture"], data["spin"]
    x, elements, values = data["x"], data["elements"], data["values"]
    projections = data["projections"]
    rows = []
    with torch.no_grad():
        reference_mixture = mixture(x, elements, elements)
        reference_spin = projections.spin_convolution(spin, values)
        baseline = {
            "mixture": milliseconds(lambda: mixture(x, elements, elements), cuda),
            "spin": milliseconds(lambda: projections.spin_convolution(spin, values), cuda),
        }
        print(
            f"{'kernel':<10}{'precision':<10}{'tiles':<72}{'ms':>8}{'PyTorch':>9}{'rel.diff':>10}"
        )
        for name, ms in baseline.items():
            print(f"{name:<10}{'-':<10}{'PyTorch operators':<72}{ms:>8.2f}{ms:>9.2f}{'-':>10}")
        defaults = {key: getattr(triton_kernels, key) for v in VARIANTS for key in v}
        for precision in args.precisions:
            mixture.triton_precision = spin.triton_precision = precision
            for variant in VARIANTS:
                for key, value in {**defaults, **variant}.items():
                    setattr(triton_kernels, key, value)
                outputs = {
                    "mixture": (
                        lambda: mixture(x, elements, elements),
                        reference_mixture,
                    ),
                    "spin": (lambda: projections.spin_convolution(spin, values), reference_spin),
                }
                for name, (call, reference) in outputs.items():
                    row = {
                        "kernel": name,
                        "precision": precision,
                        "tiles": {**defaults, **variant},
                        "ms": milliseconds(call, cuda),
                        "pytorch_ms": baseline[name],
                        "max_difference_relative": relative(call(), reference),
                    }
                    rows.append(row)
                    tiles = ", ".join(f"{k}={v}" for k, v in variant.items()) or "defaults"
                    print(
                        f"{name:<10}{precision:<10}{tiles:<72}{row['ms']:>8.2f}"
                        f"{row['pytorch_ms']:>9.2f}{row['max_difference_relative']:>10.1e}"
                    )
        for key, value in defaults.items():
            setattr(triton_kernels, key, value)
    write_json(
        args.out,
        {
            "benchmark": "fused_kernels",
            "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
            "torch": torch.__version__,
            "grids": args.grids,
            "width": args.width,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
