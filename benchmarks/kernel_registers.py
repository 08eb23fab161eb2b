"""Registers, spills and shared memory of the fused Triton kernels, compiled for a Hopper GPU
(sm_90a) on any machine, no GPU needed: Triton compiles ahead of time to PTX, and the
``ptxas`` its wheel carries assembles that PTX and reports each kernel's resources (``-v``).

A kernel that spills registers to local memory, or whose registers or shared memory allow few
programs per multiprocessor, runs far below its roofline: this screens tile choices before a
GPU session times them (``triton_tiles.py``). For each tile variant of ``triton_tiles.py``
at SpinConv-All's sizes (hidden 32, mid 256, 16 x 12 grid, 40 values per grid) and each
``tl.dot`` precision: registers per thread, spill stores/loads (bytes), shared memory (bytes),
the programs one multiprocessor can hold (65,536 registers, 228 KiB shared memory, at most 64
warps), the kernel's instructions, and its innermost loop's instructions, tensor-core
products and spill accesses per iteration (its SASS, from the wheel's ``nvdisasm``; ``S``:
``ptxas`` serialized the kernel's ``wgmma`` products, its warning C7515). Prints a table,
writes JSON.

    python benchmarks/kernel_registers.py --out benchmarks/results/kernel_registers_sm90.json

(Triton 3.6, the H100 image's, from a folder it was installed in with ``pip install --target
DIR triton==3.6.0 --no-deps``: ``PYTHONPATH=DIR python benchmarks/kernel_registers.py --out
benchmarks/results/kernel_registers_sm90_triton36.json``.)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_tiles import VARIANTS

from forcecalc.atomic import write_json
from forcecalc.models import triton_kernels

#: SpinConv-All's sizes: hidden channels, mid channels, latitudes, longitudes, values per grid,
#: Gaussians of the distance basis.
CHANNELS, MID, LAT, LONG, WIDTH, BASIS = 32, 256, 16, 12, 40, 512
#: The integer arguments that are multiples of 16 at SpinConv-All's sizes: a launch specializes
#: them (and every pointer, 16-byte aligned) as such, which lets the compiler vectorize loads.
DIVISIBLE = {"n_in", "n_out", "n_mid", "n_basis", "plane", "channels", "lat", "n_columns"}
#: One Hopper multiprocessor (H100/H200): registers, shared memory (bytes), warps.
SM_REGISTERS, SM_SHARED, SM_WARPS = 65536, 228 * 1024, 64
#: Shared memory the hardware reserves per program (block) beside what the kernel asks for.
BLOCK_RESERVED_SHARED = 1024


def sass_census(sass: str) -> dict[str, int]:
    """A kernel's SASS (``nvdisasm -c``) instructions, and its innermost loop's (the
    shortest body that a backward branch closes): instructions, tensor-core products
    (``HGMMA``/``HMMA``) and local-memory (spill) accesses per iteration.  A static measure
    of a product's main loop: the fewer instructions beside its tensor-core products, the
    closer it can run to their peak.  Loop zeros for a kernel without a loop.  The shortest
    loop is taken for the hot one (true of these kernels, checked against their SASS); outer
    loops and called subroutines are not counted."""
    labels: dict[str, int] = {}
    instructions: list[str] = []  # without their predicates
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
        instruction = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if instruction:
            instructions.append(re.sub(r"^@!?U?P\w+\s+", "", instruction.group(1)))
    bodies = []
    for end, text in enumerate(instructions):
        target = re.match(r"BRA\b.*?(\.L_x_\d+)", text)
        if target and labels.get(target.group(1), end) < end:  # not the final BRA to itself
            bodies.append(instructions[labels[target.group(1)] : end + 1])
    if not bodies:
        return {
            "instructions": len(instructions),
            "loop_instructions": 0,
            "loop_mma": 0,
            "loop_local": 0,
        }
    opcodes = [text.split()[0].split(".")[0] for text in min(bodies, key=len)]
    return {
        "instructions": len(instructions),
        "loop_instructions": len(opcodes),
        "loop_mma": sum(op in ("HGMMA", "HMMA") for op in opcodes),
        "loop_local": sum(op in ("LDL", "STL") for op in opcodes),
    }


def ptxas() -> str:
    """The newest ``ptxas`` in Triton's wheel (the one that reads the PTX version it writes)."""
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (folder / name).exists():
            return str(folder / name)
    raise FileNotFoundError(f"no ptxas in {folder}")


def resources(
    kernel: Any,
    constexprs: dict[str, Any],
    num_warps: int,
    num_stages: int = 3,
    types: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Compile ``kernel`` for sm_90a with ``constexprs`` (every other argument a float32
    pointer if it ends in ``_ptr``, else a 32-bit integer, unless ``types`` names its type),
    specialized as a launch at SpinConv-All's sizes specializes it (pointers and
    :data:`DIVISIBLE` integers multiples of 16), and read its resources."""
    signature = {
        name: "constexpr" if name in constexprs else ("*fp32" if name.endswith("_ptr") else "i32")
        for name in kernel.arg_names
    }
    for name in ("index_ptr", "column_ptr", "row_ptr"):  # int64 tables
        if name in signature:
            signature[name] = "*i64"
    for name in ("coeff", "eps"):  # float scalars
        if name in signature:
            signature[name] = "fp32"
    signature.update(types or {})
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if name not in constexprs and (name.endswith("_ptr") or name in DIVISIBLE)
    }
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    with tempfile.TemporaryDirectory() as folder:
        source, cubin = os.path.join(folder, "kernel.ptx"), os.path.join(folder, "kernel.cubin")
        Path(source).write_text(compiled.asm["ptx"])
        report = subprocess.run(
            [ptxas(), "-v", "--gpu-name", "sm_90a", source, "-o", cubin],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        nvdisasm = str(Path(ptxas()).parent / "nvdisasm")
        sass = subprocess.run(
            [nvdisasm, "-c", cubin], capture_output=True, text=True, check=True
        ).stdout
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    shared = int(compiled.metadata.shared)
    by_registers = SM_REGISTERS // (registers * 32 * num_warps)
    by_shared = SM_SHARED // (shared + BLOCK_RESERVED_SHARED)
    return {
        "registers": registers,
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
        "shared_bytes": shared,
        "num_warps": num_warps,
        "programs_per_sm": min(by_registers, by_shared, SM_WARPS // num_warps),
        # ptxas's C7515: the tensor-core products wait for each other (no pipelining)
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in report,
        **sass_census(sass),
    }


def kernels(precision: str) -> dict[str, tuple[Any, dict[str, Any], int, int]]:
    """Each kernel with the constexprs, warps and stages its launcher uses at SpinConv-All's
    sizes."""
    k = triton_kernels
    dot = k._dot_size

    def product(tiles: tuple[int, int, int], n_in: int) -> dict[str, Any]:
        block_m, block_n, block_k = k.tile_sizes(tiles, n_in)
        split = precision == "tf32x3" and k.SPLIT_WEIGHTS
        return {
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_K": block_k,
            "PRECISION": precision,
            "SPLIT": split,
        }

    spectra = {
        "GRIDS": k.SPECTRA_GRIDS,
        "WIDTH": k.slot_chunks(WIDTH)[0],
        "REST": k.slot_chunks(WIDTH)[1],
        "CHANNELS": dot(CHANNELS),
        "LAT": dot(LAT),
        "WEIGHTED": False,
        "ROUND": False,
        "PRECISION": precision,
        "SPLIT": precision == "tf32x3" and k.SPLIT_WEIGHTS,
    }
    spectra_product = {
        "WIDTH": spectra["WIDTH"],
        "REST": spectra["REST"],
        "CHANNELS": dot(CHANNELS),
        "PER_GROUP": CHANNELS // 4,
        "LAT": dot(LAT),
        "KB": k.power_of_two_chunks(LONG, 1)[0],
        "KB_REST": k.power_of_two_chunks(LONG, 1)[1],
        **{key: spectra[key] for key in ("WEIGHTED", "ROUND", "PRECISION", "SPLIT")},
    }
    spectra_kernel = (
        (k._spectra_product_kernel, spectra_product, k.SPECTRA_ONE_PRODUCT_WARPS, 1)
        if k.SPECTRA_ONE_PRODUCT
        else (k._spectra_kernel, spectra, k.SPECTRA_WARPS, k.SPECTRA_STAGES)
    )
    out = dot(MID // 4)  # 4 groups of 8 channels
    inverse = {
        "SEGMENTS": max(1, k.INVERSE_COLUMNS // out),
        "OUT": out,
        "LONG": dot(LONG),
        "NORM": True,
        "AFFINE": True,
    }
    linear = {**product(k.LINEAR_TILES, MID), "ADD": True, "SWISH": True, "ROUND": False}
    basis = product(k.LINEAR_TILES, BASIS)
    mixture = product(k.MIXTURE_TILES, MID)
    products = product(k.PRODUCTS_TILES, CHANNELS // 4 * LAT)
    return {
        "linear (sum, Swish)": (k._linear_kernel, linear, k.LINEAR_WARPS, k.LINEAR_STAGES),
        "basis_linear": (k._basis_linear_kernel, basis, k.LINEAR_WARPS, k.LINEAR_STAGES),
        "mixture_of_experts": (k._mixture_kernel, mixture, k.MIXTURE_WARPS, k.MIXTURE_STAGES),
        "spin_spectra": spectra_kernel,
        "spin_pool products": (
            k._products_kernel,
            products,
            k.PRODUCTS_WARPS,
            k.PRODUCTS_STAGES,
        ),
        "spin_pool inverse (GroupNorm)": (k._inverse_kernel, inverse, 4, 3),
    }


def _loop(row: dict[str, Any]) -> str:
    serialized = " S" if row["wgmma_serialized"] else ""
    loop = f"{row['loop_instructions']}/{row['loop_mma']}/{row['loop_local']}{serialized}"
    return f"{row['instructions']:>7}{loop:>22}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precisions", nargs="+", default=["tf32x3", "tf32"])
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results" / "kernel_registers_sm90.json"),
    )
    args = parser.parse_args()
    defaults = {key: getattr(triton_kernels, key) for variant in VARIANTS for key in variant}
    rows = []
    print(
        f"{'kernel':<30}{'precision':<10}{'variant':<8}{'regs':>6}{'spill st/ld':>13}"
        f"{'shared':>9}{'warps':>6}{'programs/SM':>12}{'instr':>7}{'loop: instr/mma/local':>22}"
    )
    try:
        for precision in args.precisions:
            for number, variant in enumerate(VARIANTS):
                for key, value in {**defaults, **variant}.items():
                    setattr(triton_kernels, key, value)
                for name, (kernel, constexprs, warps, stages) in kernels(precision).items():
                    row = {
                        "kernel": name,
                        "precision": precision,
                        "variant": number,
                        "tiles": {**defaults, **variant},
                        "constexprs": constexprs,
                        **resources(kernel, constexprs, warps, stages),
                    }
                    rows.append(row)
                    print(
                        f"{name:<30}{precision:<10}{number:<8}{row['registers']:>6}"
                        f"{row['spill_stores']:>7}/{row['spill_loads']:<5}"
                        f"{row['shared_bytes']:>9}{warps:>6}{row['programs_per_sm']:>12}"
                        f"{_loop(row)}"
                    )
    finally:
        for key, value in defaults.items():
            setattr(triton_kernels, key, value)
    # the element-wise kernels: the geometry's (float64) and the split; no tile variants
    warps = triton_kernels.ELEMENTWISE_WARPS
    float64 = {"frames_ptr": "*fp64", "unit_ptr": "*fp64", "out_ptr": "*fp64"}
    for name, kernel, constexprs, types, precision in (
        ("splat_directions", triton_kernels._directions_kernel, {"POLE_EPS2": 1e-12}, float64,
         "float64"),
        ("splat_directions bins", triton_kernels._bins_kernel, {}, {"angles_ptr": "*fp64"},
         "float64"),
        ("tf32_split", triton_kernels._split_kernel, {}, {}, "float32"),
    ):  # fmt: skip
        constexprs = {**constexprs, "BLOCK": triton_kernels.ELEMENTWISE_ENTRIES}
        row = {
            "kernel": name,
            "precision": precision,
            "constexprs": constexprs,
            **resources(kernel, constexprs, warps, types=types),
        }
        rows.append(row)
        print(
            f"{name:<30}{precision:<10}{'':<8}{row['registers']:>6}"
            f"{row['spill_stores']:>7}/{row['spill_loads']:<5}{row['shared_bytes']:>9}"
            f"{warps:>6}{row['programs_per_sm']:>12}{_loop(row)}"
        )
    write_json(
        args.out,
        {
            "benchmark": "kernel_registers",
            "target": "sm_90a",
            "triton": triton.__version__,
            "variants": VARIANTS,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
