"""The replayed fixed-shape forward at batch 1 (the 66-atom slab of ``speed.py``): eager
against ``torch.compile`` (static shapes) inside the same CUDA graph replay.

Under a CUDA graph the launch cost is gone, but every operator still runs as its own kernel
(~500 for SpinConv-All, a few microseconds each at this size); ``torch.compile`` fuses the
elementwise ones.  For each model and variant: the seconds to set up (compilation, warm-up and
capture), the median milliseconds of one replay with the forces copied back (as
``speed.py``'s "replayed forward") and the largest force difference to the eager replay,
relative to the largest force.  With ``--profile``: the busiest kernels of the eager replay.

    python benchmarks/replay_compile.py --out benchmarks/results/replay_compile_cuda.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from speed import CONFIGS, hardware, structure

from forcecalc.atomic import write_json
from forcecalc.compiled import COMPILE_MODES, compiled_function
from forcecalc.graph import Batch
from forcecalc.models.registry import build_model
from forcecalc.replay import GraphReplay

#: ``torch.compile`` modes timed beside the eager forward by default: all that the
#: calculator accepts.
MODES = list(COMPILE_MODES)


def replay_ms(replay: GraphReplay, inputs: dict[str, torch.Tensor], repeats: int) -> float:
    """Median milliseconds of one replay with the forces copied to the host."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        replay(inputs)["forces"].cpu()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def busiest_kernels(replay: GraphReplay, inputs: dict[str, torch.Tensor], top: int) -> str:
    """The profiler's table of the ``top`` kernels by device time over 10 replays."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            replay(inputs)["forces"].cpu()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--modes", nargs="*", default=MODES, choices=MODES, help="torch.compile modes"
    )
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="busiest kernels (eager)")
    parser.add_argument("--out", default="benchmarks/results/replay_compile.json")
    args = parser.parse_args()
    rows = []
    print(f"{'model':<14}{'variant':<28}{'setup s':>9}{'replay ms':>11}{'rel |dF|':>11}")
    for name in args.models:
        kind, kwargs = CONFIGS[name]
        model = build_model(kind, dict(kwargs)).to(args.device).eval()
        atoms = structure(66, 0)
        batch = Batch.from_atoms([atoms], cutoff=model.cutoff).to(dtype=torch.float32)
        inputs = model.fixed_shape_inputs(batch)
        eager_forces = None
        for mode in [None, *args.modes]:
            function = model.fixed_shape_forward
            if mode is not None:
                torch._dynamo.reset()
                function = compiled_function(function, mode)
            start = time.perf_counter()
            try:
                replay = GraphReplay(function, args.device)
                forces = replay(inputs)["forces"].cpu()
            except Exception as error:  # a mode that fails here is reported, not fatal
                print(f"{name:<14}{mode or 'eager':<28} failed: {str(error).splitlines()[0]}")
                rows.append({"model": name, "variant": mode or "eager", "error": str(error)})
                continue
            setup = time.perf_counter() - start
            ms = replay_ms(replay, inputs, args.repeats)
            if eager_forces is None:
                eager_forces = forces
            scale = float(eager_forces.abs().max())
            difference = float((forces - eager_forces).abs().max()) / scale
            print(f"{name:<14}{mode or 'eager':<28}{setup:>9.1f}{ms:>11.2f}{difference:>11.1e}")
            rows.append(
                {
                    "model": name,
                    "variant": mode or "eager",
                    "atoms": len(atoms),
                    "setup_seconds": setup,
                    "replay_ms": ms,
                    "max_force_difference_relative": difference,
                    "captures": replay.captures,
                }
            )
            if args.profile and mode is None:
                print(busiest_kernels(replay, inputs, 20))
    write_json(args.out, {"benchmark": "replay_compile", "hardware": hardware(False), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
