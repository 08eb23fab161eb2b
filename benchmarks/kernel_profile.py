"""Where a forward pass spends its time: operators dispatched, host synchronisations, bytes
moved and matrix-product FLOPs per operator (a roofline), and the top operators by measured
time, for the configurations of ``speed.py`` (SpinConv-All, ForceNet-All).

A batch-1 forward on a GPU is bound by launching kernels (the host dispatches one operator
after the other) and stalls at every host synchronisation (a data-dependent shape, a
``.item()``, a copy from pageable host memory); a large batch is bound by the kernels
themselves, i.e. by memory traffic or matrix-product throughput.  Per forward:

1. operators reaching the dispatcher, those that launch work (not views), and the host
   synchronisations among them, each with the line of forcecalc that issued it;
2. the roofline: for every launching operator (by line), the bytes its inputs and outputs
   occupy and the FLOPs of matrix products; ``max(bytes / bandwidth, flops / peak)`` summed
   is the time a device with that bandwidth and peak needs at the least when each operator is
   one kernel (device independent: it can be computed on the CPU for an H100);
3. unless ``--roofline-only``: the wall time and ``torch.profiler``'s top operators by self
   device time on CUDA (self CPU time on the CPU).

Prints tables and writes JSON (atomically).

    python benchmarks/kernel_profile.py --devices cuda --batch 1 64 --out DIR/profile_cuda.json
    python benchmarks/kernel_profile.py --devices cpu --batch 16 --roofline-only --cuda-chunks
    python benchmarks/kernel_profile.py --devices cpu --batch 1 --roofline-only --cuda-chunks \
        --fixed-shapes     (the forward a CUDA graph replays: no host synchronisation)
    python benchmarks/kernel_profile.py --devices cpu --batch 16 --roofline-only --cuda-chunks \
        --models spinconv_all --triton     (the roofline with the fused Triton kernels)
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from speed import CONFIGS, available_devices, hardware, structure
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import forcecalc.models.spinconv as spinconv
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
#: H100 SXM peaks (dense): float32 on CUDA cores, TF32 on tensor cores (TFLOP/s).
PEAK_FP32_TFLOPS = 67.0
PEAK_TF32_TFLOPS = 495.0
#: Tensor-core products per ``tl.dot`` with ``input_precision="tf32x3"``.
TF32X3_PRODUCTS = 3


#: Matrix products: (operator, index of the left factor) for the GEMM FLOP count.
PRODUCTS = {
    "aten.mm": 0,
    "aten.bmm": 0,
    "aten.addmm": 1,
    "aten.addmm_": 1,
    "aten.baddbmm": 1,
    "aten.baddbmm_": 1,
}


def tensor_bytes(value: Any) -> int:
    """Bytes a kernel reads or writes for ``value`` (tensors, lists of them): the elements
    of each tensor, at most its storage (an expanded view reads its storage once)."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
        return min(value.numel() * value.element_size(), storage)
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def _where() -> str:
    """``file:line`` of the innermost forcecalc frame on the stack."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(PACKAGE)]
    return (
        f"{Path(frames[-1].filename).relative_to(PACKAGE)}:{frames[-1].lineno}" if frames else "?"
    )


class OperatorLog(TorchDispatchMode):
    """Counts the operators that reach the dispatcher and, for those that launch work, the
    bytes they move (inputs and outputs) and the FLOPs of matrix products, by operator and
    ``file:line`` of the innermost forcecalc frame; and where the synchronising ones are."""

    def __init__(self) -> None:
        super().__init__()
        self.operators: collections.Counter[str] = collections.Counter()
        self.synchronizing: collections.Counter[str] = collections.Counter()
        self.traffic: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])

    def __enter__(self) -> OperatorLog:
        # ``Tensor.tolist`` reads the data without an operator (the dispatcher never sees it);
        # on CUDA it copies to the host and waits.
        self._tolist = torch.Tensor.tolist
        log, tolist = self, self._tolist

        def counted_tolist(tensor: torch.Tensor) -> Any:
            log.synchronizing[f"Tensor.tolist @ {_where()}"] += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        super().__exit__(*exc)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.operators[name] += 1
        if name in VIEWS:
            return out
        where = _where()
        boolean_index = name == "aten.index" and any(
            index is not None and index.dtype == torch.bool for index in args[1]
        )
        if name in SYNCHRONIZING or boolean_index:
            mask = " (boolean mask)" if boolean_index else ""
            self.synchronizing[f"{name}{mask} @ {where}"] += 1
        flops = 0.0
        if name in PRODUCTS:
            left, right = args[PRODUCTS[name]], args[PRODUCTS[name] + 1]
            flops = 2.0 * left.numel() * right.shape[-1]
        entry = self.traffic[f"{name} @ {where}"]
        entry[0] += 1
        entry[1] += tensor_bytes(list(args)) + tensor_bytes(out)
        entry[2] += flops
        return out


def fused_kernel_stand_ins(log: OperatorLog, flop_scale: float) -> dict[str, Callable]:
    """Stand-ins for the fused Triton kernels (``forcecalc.models.triton_kernels``) that count
    each call in ``log`` as one kernel moving its inputs and output once (the re-reads of
    tiles served by the caches; ``spin_pool``'s two kernels also their intermediate
    products) with the FLOPs of its products times ``flop_scale`` (their precision's rate
    expressed at the roofline's peak), and return zeros of the output's shape made outside the
    log: the roofline of the fused path, computed on the CPU without running Triton (values
    do not change what the rest of the forward moves)."""

    def record(name: str, moved: int, flops: float, shape: tuple, like: torch.Tensor) -> Any:
        key = f"triton.{name}"
        log.operators[key] += 1
        entry = log.traffic[f"{key} @ {_where()}"]
        entry[0] += 1
        entry[1] += moved
        entry[2] += flops * flop_scale
        with _disable_current_modes():
            return like.new_zeros(shape)

    def linear(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        *_: Any,
        addend: torch.Tensor | None = None,
        **__: Any,
    ) -> Any:
        (n, n_in), n_out = x.shape, weight.shape[0]
        read = [x, weight, bias] + ([] if addend is None else [addend])
        moved = tensor_bytes(read) + n * n_out * x.element_size()
        return record("linear", moved, 2.0 * n * n_in * n_out, (n, n_out), x)

    def basis_linear(
        distances: torch.Tensor,
        offset: torch.Tensor,
        coeff: float,
        weight: torch.Tensor,
        bias: torch.Tensor,
        *_: Any,
    ) -> Any:
        n, (n_out, n_basis) = len(distances), weight.shape
        moved = tensor_bytes([distances, offset, weight, bias]) + n * n_out * weight.element_size()
        return record("basis_linear", moved, 2.0 * n * n_basis * n_out, (n, n_out), weight)

    def splat_directions(
        frames: torch.Tensor, unit: torch.Tensor, index: torch.Tensor, *_: Any
    ) -> Any:
        entries = index.numel()
        # two kernels and PyTorch's atan2 and asin over [3, n, width] float64 planes: the
        # directions' kernel writes 3, atan2 reads 2 and writes 1, asin 1 and 1, the bins'
        # kernel reads 2 and the index and writes the four factors (int64, float32)
        moved = tensor_bytes([frames, unit, index]) + entries * 8 * (3 + 3 + 2 + 2)
        moved += index.element_size() * entries + entries * (8 + 4 + 8 + 4)
        record("splat_directions", moved, 0.0, (1,), unit)
        with _disable_current_modes():
            column, row = torch.zeros_like(index), torch.zeros_like(index)
            fraction = torch.zeros(index.shape, dtype=torch.float32, device=index.device)
            return column, fraction, row, torch.zeros_like(fraction)

    def mixture_of_experts(
        h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mixture: torch.Tensor, *_: Any
    ) -> Any:
        (n, n_in), experts = h.shape, mixture.shape[1]
        mid = weight.shape[0] // experts
        moved = tensor_bytes([h, weight, bias, mixture]) + n * mid * h.element_size()
        return record("mixture_of_experts", moved, 2.0 * n * n_in * experts * mid, (n, mid), h)

    def spin_spectra(
        values: torch.Tensor,
        index: torch.Tensor,
        longitude: Any,
        latitude: Any,
        groups: int,
        *_: Any,
    ) -> Any:
        (n, width), channels = index.shape, values.shape[1]
        long, lat = longitude.long, latitude.lat
        gathered = n * width * channels * values.element_size()  # each grid's values, once
        out = n * channels * long * lat * values.element_size()
        factors = [index, longitude.column, longitude.fraction, longitude.table]
        factors += [latitude.row, latitude.fraction]
        factors += [] if latitude.weight is None else [latitude.weight]
        moved = tensor_bytes(factors) + gathered + out
        shape = (long, groups, n, channels // groups * lat)
        return record("spin_spectra", moved, 2.0 * n * width * channels * long * lat, shape, values)

    def spin_pool(
        spectra: torch.Tensor,
        pairs: torch.Tensor,
        inverse: torch.Tensor,
        bias: torch.Tensor,
        precision: str = "tf32x3",
        norm: torch.nn.GroupNorm | None = None,
    ) -> Any:
        long, groups, n, n_in = spectra.shape
        # pairs [pairs, groups, 2 n_out, 2 n_in] (paired_kernels' layout): one product each
        n_out = pairs.shape[-2] // 2
        if pairs.shape[1:] != (groups, 2 * n_out, 2 * n_in):  # the layout changed: count anew
            raise ValueError(f"pairs {tuple(pairs.shape)}: not [_, {groups}, 2 M, {2 * n_in}]")
        out = n * groups * n_out * spectra.element_size()
        # two kernels: the products [long, n, groups * n_out] are written, then read back
        read = [spectra, pairs, inverse, bias]
        read += [] if norm is None or not norm.affine else [norm.weight, norm.bias]
        moved = tensor_bytes(read) + out * (1 + 2 * long)
        flops = 2.0 * n * groups * 4 * n_in * n_out * len(pairs)
        return record("spin_pool", moved, flops, (n, groups * n_out), spectra)

    return {
        "linear": linear,
        "basis_linear": basis_linear,
        "splat_directions": splat_directions,
        "mixture_of_experts": mixture_of_experts,
        "spin_spectra": spin_spectra,
        "spin_pool": spin_pool,
    }


def roofline(log: OperatorLog, peak_flops: float, bandwidth: float, top: int) -> dict[str, Any]:
    """Lower bound of a forward's device time: every operator as one kernel that runs at the
    device's peak, ``max(bytes / bandwidth, flops / peak_flops)`` (no fusion, no caches)."""
    rows = [
        {
            "operator": key,
            "calls": calls,
            "gigabytes": moved / 1e9,
            "gemm_gflop": flops / 1e9,
            "bound_ms": 1000 * max(moved / bandwidth, flops / peak_flops),
        }
        for key, (calls, moved, flops) in log.traffic.items()
    ]
    rows.sort(key=lambda row: -row["bound_ms"])
    return {
        "bound_ms": sum(row["bound_ms"] for row in rows),
        "gigabytes": sum(row["gigabytes"] for row in rows),
        "gemm_gflop": sum(row["gemm_gflop"] for row in rows),
        "top": rows[:top],
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_case(
    model: torch.nn.Module, batch: Batch, device: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Operator counts, roofline and (unless ``args.roofline_only``) the profile of
    ``model(batch)`` without autograd, or with ``args.fixed_shapes`` of the model's
    fixed-shape forward (what a CUDA graph replays; its inputs built once, outside)."""
    if args.fixed_shapes:
        inputs = model.fixed_shape_inputs(batch)

        def forward() -> Any:
            return model.fixed_shape_forward(inputs)

    else:

        def forward() -> Any:
            return model(batch)

    peak = 1e12 * (args.peak_tflops or (PEAK_TF32_TFLOPS if args.tf32 else PEAK_FP32_TFLOPS))
    warm_up, log = OperatorLog(), OperatorLog()
    with torch.no_grad():
        for current in (warm_up, log):
            if args.triton:
                import forcecalc.models.triton_kernels as triton_kernels

                scale = peak / (1e12 * PEAK_TF32_TFLOPS / TF32X3_PRODUCTS)
                for name, stand_in in fused_kernel_stand_ins(current, scale).items():
                    setattr(triton_kernels, name, stand_in)
            if current is warm_up:
                forward()
                synchronize(device)
            else:
                with log:
                    forward()
    case = {
        "operators": sum(log.operators.values()),
        "launching_operators": sum(n for op, n in log.operators.items() if op not in VIEWS),
        "synchronizations": sum(log.synchronizing.values()),
        "synchronizing": dict(log.synchronizing.most_common()),
        "roofline": roofline(log, peak, 1e12 * args.bandwidth_tbs, args.top),
    }
    if not args.roofline_only:
        case.update(timed(forward, device, args.repeats, args.top))
    return case


def timed(forward: Callable[[], Any], device: str, repeats: int, top: int) -> dict[str, Any]:
    """Wall time per ``forward()`` and the ``top`` operators by self time (device time on
    CUDA)."""
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            forward()
        synchronize(device)
        wall_ms = 1000 * (time.perf_counter() - start) / repeats
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(repeats):
                forward()
            synchronize(device)
    on_device = device == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
    kernels = [event for event in prof.events() if event.device_type.name == "CUDA"]
    return {
        "wall_ms": wall_ms,
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


def report(case: dict[str, Any]) -> None:
    """Print one case."""
    bound = case["roofline"]
    head = f"\n{case['model']} on {case['device']}, batch {case['batch']} ({case['atoms']} atoms): "
    if "wall_ms" in case:
        head += f"{case['wall_ms']:.1f} ms per forward; "
    kernels = case.get("device_kernels")
    print(
        head
        + f"{case['operators']} operators, {case['launching_operators']} launching"
        + ("" if kernels is None else f", {kernels:.0f} device kernels")
        + f", {case['synchronizations']} host synchronizations"
    )
    for where, n in case["synchronizing"].items():
        print(f"    sync x{n}: {where}")
    print(
        f"    roofline (each operator one kernel at peak): {bound['bound_ms']:.2f} ms = "
        f"{case['atoms'] / bound['bound_ms'] * 1000:.0f} atoms/s; {bound['gigabytes']:.2f} GB "
        f"moved, {bound['gemm_gflop']:.1f} GFLOP of matrix products"
    )
    print(f"    {'operator @ line':<56}{'calls':>6}{'GB':>9}{'GFLOP':>9}{'bound ms':>10}")
    for row in bound["top"]:
        print(
            f"    {row['operator'][:55]:<56}{row['calls']:>6}{row['gigabytes']:>9.3f}"
            f"{row['gemm_gflop']:>9.1f}{row['bound_ms']:>10.3f}"
        )
    if "top" in case:
        print(f"    {'operator (profiler)':<56}{'calls':>6}{'self ms':>10}")
        for row in case["top"]:
            print(f"    {row['name'][:55]:<56}{row['calls']:>6.0f}{row['self_ms']:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu and cuda")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--atoms", type=int, default=66, help="atoms per structure (38, 66, 146)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--tf32", action="store_true", help="CUDA: float32 matrix products in TF32")
    parser.add_argument(
        "--roofline-only", action="store_true", help="only counts and roofline (no timing)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"roofline: matrix-product peak (default H100 SXM: {PEAK_FP32_TFLOPS:g} float32, "
        f"{PEAK_TF32_TFLOPS:g} with --tf32)",
    )
    parser.add_argument("--bandwidth-tbs", type=float, default=3.35, help="roofline: TB/s")
    parser.add_argument(
        "--cuda-chunks",
        action="store_true",
        help="on the CPU, chunk SpinConv's grids and mixtures of experts as on CUDA (for the "
        "roofline of the CUDA path; slow)",
    )
    parser.add_argument(
        "--fixed-shapes",
        action="store_true",
        help="profile the fixed-shape forward (the one CUDA graphs replay), inputs built outside",
    )
    parser.add_argument(
        "--triton",
        action="store_true",
        help="SpinConv with the fused Triton kernels (with_triton_kernels, tf32x3): on the CPU "
        "with --roofline-only, each kernel counted by a stand-in (no Triton run) as one kernel "
        "moving its inputs and output once, its products at a third of the TF32 peak",
    )
    parser.add_argument("--out", default="benchmarks/results/kernel_profile.json")
    args = parser.parse_args()
    if args.triton and not args.roofline_only:
        parser.error("--triton counts the fused kernels by stand-ins: use it with --roofline-only")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    devices = available_devices(parser, args.devices)
    if args.cuda_chunks:
        spinconv.CHUNK_BYTES = spinconv.CHUNK_BYTES_CUDA
        spinconv.MOE_CHUNK_ROWS = 1 << 62
    cases = []
    for name in args.models:
        kind, kwargs = CONFIGS[name]
        torch.manual_seed(0)
        model = build_model(kind, kwargs).eval()
        if args.triton and kind == "spinconv":
            from forcecalc.models.triton_kernels import with_triton_kernels

            model = with_triton_kernels(model)
        for device in devices:
            model = model.to(device=device, dtype=torch.float32)
            for batch_size in args.batch:
                atoms = [structure(args.atoms, seed) for seed in range(batch_size)]
                batch = Batch.from_atoms(atoms, cutoff=model.cutoff).to(device, torch.float32)
                case = profile_case(model, batch, device, args)
                case.update(
                    model=name,
                    device=device,
                    batch=batch_size,
                    atoms=batch.n_atoms,
                    fixed_shapes=args.fixed_shapes,
                    triton=args.triton and kind == "spinconv",
                )
                cases.append(case)
                report(case)
    machine = hardware(args.tf32)
    write_json(args.out, {"benchmark": "kernel_profile", "hardware": machine, "cases": cases})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
