"""Where a forward pass spends its time: operators dispatched, host synchronisations, and the
top operators by time, for the configurations of ``speed.py`` (SpinConv-All, ForceNet-All).

A batch-1 forward on a GPU is bound by launching kernels (the host dispatches one operator
after the other) and stalls at every host synchronisation (a data-dependent shape, a
``.item()``, a copy from pageable host memory); a large batch is bound by the kernels
themselves.  This script measures both, so one short GPU session tells where to work next:

1. counts, per forward: operators reaching the dispatcher, those that launch work (not views),
   and the host synchronisations among them, each with the line of forcecalc that issued it;
2. ``torch.profiler`` over ``--repeats`` forwards: the ``--top`` operators by self device time
   on CUDA (self CPU time on the CPU), in ms per forward, and the forward's wall time.

Prints tables and writes JSON (atomically).

    python benchmarks/kernel_profile.py --devices cuda --batch 1 64 --out DIR/profile_cuda.json
    python benchmarks/kernel_profile.py --models spinconv_all --batch 1   (CPU; the CPU chunks
        the mixture of experts and the grids, so its operator counts are larger than CUDA's)
"""

from __future__ import annotations

import argparse
import collections
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from speed import CONFIGS, structure
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from forcecalc.atomic import write_json
from forcecalc.graph import Batch
from forcecalc.models.registry import build_model

#: Operators that only make views (no kernel launch).
VIEWS = frozenset(
    "aten." + name
    for name in [
        "view",
        "_unsafe_view",
        "expand",
        "t",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "split",
        "split_with_sizes",
        "select",
        "slice",
        "alias",
        "detach",
        "as_strided",
        "unbind",
        "chunk",
        "narrow",
    ]
)
#: Operators that wait for the device on CUDA (data-dependent output sizes, scalars to host,
#: host-to-device copies of Python data).
SYNCHRONIZING = frozenset(
    "aten." + name
    for name in [
        "_local_scalar_dense",
        "nonzero",
        "bincount",
        "unique",
        "_unique2",
        "unique_consecutive",
        "masked_select",
        "repeat_interleave",
        "lift_fresh",
    ]
)
PACKAGE = str(Path(__file__).resolve().parent.parent / "forcecalc")


class OperatorCount(TorchDispatchMode):
    """Counts the operators that reach the dispatcher, and where the synchronising ones come
    from (``file:line`` of the innermost forcecalc frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.operators: collections.Counter[str] = collections.Counter()
        self.synchronizing: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        name = str(func.overloadpacket)
        self.operators[name] += 1
        boolean_index = name == "aten.index" and any(
            index is not None and index.dtype == torch.bool for index in args[1]
        )
        if name in SYNCHRONIZING or boolean_index:
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
            where = (
                f"{Path(frames[-1].filename).relative_to(PACKAGE)}:{frames[-1].lineno}"
                if frames
                else "?"
            )
            self.synchronizing[f"{name}{' (boolean mask)' if boolean_index else ''} @ {where}"] += 1
        return func(*args, **(kwargs or {}))


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_case(
    model: torch.nn.Module, batch: Batch, device: str, repeats: int, top: int
) -> dict[str, Any]:
    """Operator counts and profile of ``model(batch)`` without autograd."""
    with torch.no_grad():
        for _ in range(2):
            model(batch)
        synchronize(device)
        with OperatorCount() as count:
            model(batch)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(batch)
        synchronize(device)
        wall_ms = 1000 * (time.perf_counter() - start) / repeats
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                model(batch)
            synchronize(device)
    on_device = device == "cuda"
    averages = prof.key_averages()
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    rows = sorted(averages, key=lambda event: getattr(event, key, 0.0), reverse=True)[:top]
    kernels = [event for event in prof.events() if event.device_type.name == "CUDA"]
    return {
        "wall_ms": wall_ms,
        "operators": sum(count.operators.values()),
        "launching_operators": sum(n for op, n in count.operators.items() if op not in VIEWS),
        "synchronizations": sum(count.synchronizing.values()),
        "synchronizing": dict(count.synchronizing.most_common()),
        "device_kernels": len(kernels) / repeats if on_device else None,
        "top": [
            {
                "name": event.key,
                "calls": event.count / repeats,
                "self_ms": getattr(event, key, 0.0) / 1000 / repeats,
            }
            for event in rows
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu and cuda")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--atoms", type=int, default=66, help="atoms per structure (38, 66, 146)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--tf32", action="store_true", help="CUDA: float32 matrix products in TF32")
    parser.add_argument("--out", default="benchmarks/results/kernel_profile.json")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = []
    for name in args.models:
        kind, kwargs = CONFIGS[name]
        torch.manual_seed(0)
        model = build_model(kind, kwargs).eval()
        for device in devices:
            model = model.to(device=device, dtype=torch.float32)
            for batch_size in args.batch:
                atoms = [structure(args.atoms, seed) for seed in range(batch_size)]
                batch = Batch.from_atoms(atoms, cutoff=model.cutoff).to(device, torch.float32)
                case = profile_case(model, batch, device, args.repeats, args.top)
                case.update(model=name, device=device, batch=batch_size, atoms=batch.n_atoms)
                cases.append(case)
                kernels = case["device_kernels"]
                print(
                    f"\n{name} on {device}, batch {batch_size} ({batch.n_atoms} atoms): "
                    f"{case['wall_ms']:.1f} ms per forward; {case['operators']} operators, "
                    f"{case['launching_operators']} launching"
                    + ("" if kernels is None else f", {kernels:.0f} device kernels")
                    + f", {case['synchronizations']} host synchronizations"
                )
                for where, n in case["synchronizing"].items():
                    print(f"    sync x{n}: {where}")
                print(f"    {'operator':<48}{'calls':>8}{'self ms':>10}")
                for row in case["top"]:
                    print(f"    {row['name'][:47]:<48}{row['calls']:>8.0f}{row['self_ms']:>10.3f}")
    hardware = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "tf32": args.tf32,
    }
    write_json(args.out, {"benchmark": "kernel_profile", "hardware": hardware, "cases": cases})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
