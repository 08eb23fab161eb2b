"""How many structures fit on the device: a memory model in atoms and edges, and OOM detection.

The peak memory of one forward pass (with the autograd graph of an energy-centric model) is
close to affine in the batch's atoms and edges::

    bytes ≈ bytes_fixed + bytes_per_atom * n_atoms + bytes_per_edge * n_edges

:func:`measure_memory_model` fits the three numbers per loaded model, device and dtype (again
for structures more than twice as large as it saw) from a few forward passes of growing
batches of the largest structures and of a compressed copy of them (more edges per
atom: :func:`forcecalc.relax.relaxation.memory_sample_batches`), by non-negative least squares
on the measured peaks: on CUDA the allocator's peaks, with a budget that is a fraction of the
free device memory; on a Linux CPU the process's resident high-water mark
(:func:`cpu_peak_bytes`), with a fixed budget (:data:`CPU_BUDGET_BYTES`).  Elsewhere a fixed,
generous model (:data:`CPU_MEMORY_MODEL`) is used.  Either way
the engine also survives an out-of-memory error (:func:`is_out_of_memory`): it splits the
batch, lowers its budget and goes on (see :class:`forcecalc.relax.engine.Evaluator`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from forcecalc.graph import Batch

#: Bytes per atom / per edge assumed on a CPU where peaks cannot be measured (not Linux): the
#: measured peaks of the energy-centric `spinconv-ec` with autograd, 77 KB per edge in float32
#: and 137 KB in float64 (session 11), doubled; the CPU gains nothing from huge batches anyway.
CPU_MEMORY_MODEL_BYTES = (16_384.0, 262_144.0)
#: Memory a CPU batch may use (bytes).
CPU_BUDGET_BYTES = 2 * 2**30
#: Fraction of the free CUDA memory a batch may use.
CUDA_BUDGET_FRACTION = 0.8


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of one forward pass as an affine function of atoms and edges.

    Attributes:
        bytes_per_atom: slope in the number of atoms.
        bytes_per_edge: slope in the number of edges (those given to the model, i.e. built at
            ``cutoff + skin``).
        bytes_fixed: intercept.
        budget: bytes a batch may use on the device.
    """

    bytes_per_atom: float
    bytes_per_edge: float
    bytes_fixed: float = 0.0
    budget: float = float("inf")

    def cost(self, n_atoms: int, n_edges: int) -> float:
        """Predicted peak bytes of a batch with ``n_atoms`` atoms and ``n_edges`` edges."""
        return self.bytes_fixed + self.bytes_per_atom * n_atoms + self.bytes_per_edge * n_edges

    def with_budget(self, budget: float) -> MemoryModel:
        """The same model with another budget."""
        return MemoryModel(self.bytes_per_atom, self.bytes_per_edge, self.bytes_fixed, budget)


CPU_MEMORY_MODEL = MemoryModel(*CPU_MEMORY_MODEL_BYTES, budget=CPU_BUDGET_BYTES)

#: Measured models by potential, then (device, dtype): the model and the atoms of the largest
#: structure it was measured on.
_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], tuple[MemoryModel, int]]] = (
    weakref.WeakKeyDictionary()
)


#: Words of the messages of allocation failures that are not ``torch.OutOfMemoryError``: the
#: CPU allocator's ("DefaultCPUAllocator: can't allocate memory"), cuBLAS's and cuDNN's
#: workspace failures, other backends' "out of memory".
_OUT_OF_MEMORY_WORDS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "status_alloc_failed",
)


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocation failure on any device: ``torch.cuda.OutOfMemoryError``, or a
    ``RuntimeError`` whose message is one of :data:`_OUT_OF_MEMORY_WORDS`."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in _OUT_OF_MEMORY_WORDS)


def release_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back after an out-of-memory error (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fit_memory_model(
    n_atoms: Sequence[int], n_edges: Sequence[int], peak_bytes: Sequence[float]
) -> MemoryModel:
    """Fit ``peak ≈ fixed + per_atom * atoms + per_edge * edges`` with non-negative terms.

    Args:
        n_atoms: ``[k]`` atoms of each measured batch.
        n_edges: ``[k]`` edges of each measured batch.
        peak_bytes: ``[k]`` measured peak bytes of its forward pass.

    Returns:
        The model (with an infinite budget).  With collinear samples (atoms and edges in the
        same ratio) the fit still reproduces the measured peaks, which is what the budget needs.
    """
    from scipy.optimize import nnls

    atoms = np.asarray(n_atoms, dtype=np.float64)
    edges = np.asarray(n_edges, dtype=np.float64)
    peaks = np.asarray(peak_bytes, dtype=np.float64)
    if not len(atoms) == len(edges) == len(peaks) or len(atoms) < 2:
        raise ValueError("need at least two measurements of equal length")
    # Columns scaled to ~1 so that nnls treats them evenly.
    scale = np.array([1.0, max(atoms.max(), 1.0), max(edges.max(), 1.0)])
    design = np.stack([np.ones_like(atoms), atoms, edges], axis=1) / scale
    coefficients, _ = nnls(design, peaks)
    fixed, per_atom, per_edge = coefficients / scale
    return MemoryModel(float(per_atom), float(per_edge), float(fixed))


def cuda_peak_bytes(potential: nn.Module, batch: Batch, grad: bool) -> float:
    """Peak CUDA bytes allocated by one forward pass of ``potential`` on ``batch``."""
    device = batch.positions.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.set_grad_enabled(grad):
        out = potential(batch)
        del out
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - before)


def cpu_peak_bytes(potential: nn.Module, batch: Batch, grad: bool) -> float:
    """Peak bytes one forward pass of ``potential`` on ``batch`` adds to the process's resident
    memory (Linux: the kernel's high-water mark, reset through ``/proc/self/clear_refs``,
    after glibc has returned its free pages; ``OSError`` where that is not possible)."""
    _release_free_heap()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    with torch.set_grad_enabled(grad):
        out = potential(batch)
        del out
    return float(_status_bytes("VmHWM") - before)


def cpu_peak_measurable() -> bool:
    """Whether :func:`cpu_peak_bytes` works here (Linux with a writable ``clear_refs``);
    resets nothing (a measurement resets the process's peak-memory figure, ``ru_maxrss``
    too)."""
    try:
        _status_bytes("VmHWM")
    except (OSError, ValueError):
        return False
    return os.access("/proc/self/clear_refs", os.W_OK)


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/self/status has no {field}")


def _release_free_heap() -> None:
    """Let glibc return its free heap pages (else a forward reuses them unseen)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_memory_model(
    potential: nn.Module,
    batches: Sequence[Batch],
    grad: bool,
    measure: Callable[[nn.Module, Batch, bool], float] = cuda_peak_bytes,
) -> MemoryModel:
    """Fit a :class:`MemoryModel` from forward passes of ``batches`` (growing sizes).

    Args:
        potential: the model (a :class:`~forcecalc.checkpoint.Potential` or alike).
        batches: at least two batches on the model's device and in its dtype, with edges.
        grad: run with autograd enabled (energy-centric models).
        measure: ``measure(potential, batch, grad) -> peak bytes``; CUDA's allocator peak by
            default (injectable for tests).

    Returns:
        The fitted model with an infinite budget (see :func:`memory_budget`).  Batches that
        run out of memory are left out (the smallest must fit).
    """
    sizes, peaks = [], []
    for batch in sorted(batches, key=lambda b: b.n_atoms):
        try:
            peaks.append(measure(potential, batch, grad))
        except Exception as error:
            if not is_out_of_memory(error) or not peaks:
                raise
            release_cached_memory(batch.positions.device)
            break
        sizes.append((batch.n_atoms, batch.n_edges))
    if len(peaks) == 1:  # the larger batches did not fit: all of the peak per edge
        return MemoryModel(0.0, peaks[0] / max(sizes[0][1], 1))
    return fit_memory_model([a for a, _ in sizes], [e for _, e in sizes], peaks)


def cached_memory_model(
    potential: nn.Module, device: torch.device, largest_atoms: int | None = None
) -> MemoryModel | None:
    """The model measured earlier for ``potential`` on ``device`` (``None`` if not yet, or
    if ``largest_atoms``, the largest structure to come, has more than twice the atoms of
    the largest it was measured on: an extrapolation that far is not to be trusted)."""
    cached = _MEASURED.get(potential, {}).get((str(device), str(_dtype_of(potential))))
    if cached is None or (largest_atoms is not None and largest_atoms > 2 * cached[1]):
        return None
    return cached[0]


def remember_memory_model(
    potential: nn.Module, device: torch.device, model: MemoryModel, largest_atoms: int
) -> None:
    """Keep ``model``, measured on structures of up to ``largest_atoms`` atoms, for
    ``potential`` on ``device`` for later calls (it lives as long as the potential)."""
    key = (str(device), str(_dtype_of(potential)))
    _MEASURED.setdefault(potential, {})[key] = (model, largest_atoms)


def memory_budget(device: torch.device) -> float:
    """Bytes a batch may use: a fraction of the free CUDA memory, or the fixed CPU budget."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by the allocator count as used otherwise
        free, _ = torch.cuda.mem_get_info(device)
        return CUDA_BUDGET_FRACTION * float(free)
    return float(CPU_BUDGET_BYTES)


def measurement_limit(device: torch.device) -> float:
    """Bytes a measuring forward pass may be expected to take, by the conservative
    :data:`CPU_MEMORY_MODEL`: on a Linux CPU half of the memory the kernel reports available
    (a pass beyond it would meet the out-of-memory killer, not an error); unlimited on CUDA,
    where an out-of-memory error is caught."""
    if device.type == "cuda":
        return float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _dtype_of(potential: nn.Module) -> torch.dtype | None:
    return getattr(potential, "dtype", None)
