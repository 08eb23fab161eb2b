"""The batched engine's memory model (forcecalc.relax.memory): its fit, its measurement on
the CUDA allocator or the CPU's resident peak, the samples it is measured on, out-of-memory
detection."""

from __future__ import annotations

import pytest
import torch
from relax_helpers import mixed_structures, morse_potential, single_thread

from forcecalc.relax import (
    fit_memory_model,
    is_out_of_memory,
)
from forcecalc.relax.engine import SystemSet
from forcecalc.relax.memory import (
    CPU_MEMORY_MODEL,
    MemoryModel,
    cached_memory_model,
    cpu_peak_bytes,
    cpu_peak_measurable,
    measure_memory_model,
)
from forcecalc.relax.relaxation import _auto_memory_model

__all__ = ["single_thread"]


def test_memory_model_fit_recovers_coefficients():
    """Contract: the non-negative least-squares fit of peak bytes in atoms and edges recovers
    an affine law from noisy-free samples and predicts new sizes."""
    atoms = [10, 40, 80, 200, 120]
    edges = [300, 2000, 2500, 9000, 8000]
    truth = MemoryModel(bytes_per_atom=5000.0, bytes_per_edge=1200.0, bytes_fixed=1e6)
    peaks = [truth.cost(a, e) for a, e in zip(atoms, edges, strict=True)]
    model = fit_memory_model(atoms, edges, peaks)
    assert model.bytes_per_atom == pytest.approx(5000.0, rel=1e-6)
    assert model.bytes_per_edge == pytest.approx(1200.0, rel=1e-6)
    assert model.bytes_fixed == pytest.approx(1e6, rel=1e-6)
    assert model.cost(500, 30000) == pytest.approx(truth.cost(500, 30000), rel=1e-6)
    with pytest.raises(ValueError):
        fit_memory_model([1], [2], [3.0])


def test_measure_memory_model_with_injected_measurement():
    """Contract: measure_memory_model runs the potential's batches through the measurement
    (CUDA's peak by default; injected here) and fits the model from them; batches that run
    out of memory during the measurement are left out."""
    potential = morse_potential()
    batches = []
    for size in (1, 2, 4):
        systems = SystemSet(potential.cutoff, 0.5, torch.device("cpu"))
        systems.extend(mixed_structures()[:size], list(range(size)))
        batches.append(systems.batch(0, size))

    def fake_peak(model, batch, grad):
        model(batch)
        return 1e5 + 100.0 * batch.n_atoms + 10.0 * batch.n_edges

    model = measure_memory_model(potential, batches, grad=False, measure=fake_peak)
    big = batches[-1]
    assert model.cost(big.n_atoms, big.n_edges) == pytest.approx(fake_peak(potential, big, False))

    def small_device(model, batch, grad):
        if batch.n_atoms > batches[1].n_atoms:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return fake_peak(model, batch, grad)

    partial = measure_memory_model(potential, batches, grad=False, measure=small_device)
    for batch in batches[:2]:  # fitted on the two that fit; extrapolates to the third
        expected = fake_peak(potential, batch, False)
        assert partial.cost(batch.n_atoms, batch.n_edges) == pytest.approx(expected)
    assert partial.cost(big.n_atoms, big.n_edges) == pytest.approx(
        fake_peak(potential, big, False), rel=0.05
    )


def test_memory_samples_vary_edges_per_atom():
    """The memory model is measured on batches of 1, 2, 4, 8 of the first structures and on a
    compressed copy of the largest (same atoms, about twice the edges), so that the fit can
    tell an edge's cost from an atom's (with the samples alone the two grow in one ratio and
    the fit put everything on atoms); molecules without a cell are compressed too."""
    from ase.build import fcc111, molecule

    from forcecalc.relax.relaxation import DENSE_SAMPLE_SCALE, memory_sample_batches

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    slab.pbc = True
    potential = morse_potential()
    structures = [slab] * 6 + [molecule("CH4")] * 4
    batches = memory_sample_batches(potential, structures, 0.0, torch.device("cpu"))
    assert [b.n_systems for b in batches] == [1, 2, 4, 8, 8]
    plain, dense = batches[-2], batches[-1]
    assert dense.n_atoms == plain.n_atoms
    assert dense.n_edges > 1.5 * plain.n_edges
    torch.testing.assert_close(dense.positions, plain.positions * DENSE_SAMPLE_SCALE)
    ratios = [b.n_edges / b.n_atoms for b in batches]
    assert max(ratios) > 1.5 * min(ratios)
    model = fit_memory_model(
        [b.n_atoms for b in batches],
        [b.n_edges for b in batches],
        [1e6 + 1e3 * b.n_atoms + 50.0 * b.n_edges for b in batches],
    )
    assert model.bytes_per_edge == pytest.approx(50.0, rel=1e-6)
    assert model.bytes_per_atom == pytest.approx(1e3, rel=1e-6)


def test_out_of_memory_detection():
    """Contract: CUDA's OutOfMemoryError, RuntimeErrors saying "out of memory", the CPU
    allocator's refusal and cuBLAS's allocation failure count as out-of-memory; other errors
    do not."""
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20 MiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: Out of memory"))
    with pytest.raises(RuntimeError) as refused:  # 400 TB, more than any address space
        torch.empty(10**14)
    assert is_out_of_memory(refused.value), str(refused.value)  # the CPU allocator's message
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.skipif(not cpu_peak_measurable(), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_peak_bytes_sees_the_forward_pass():
    """On a Linux CPU the memory model is measured, not assumed: the peak a forward adds to
    the resident memory covers the tensors it makes (a potential allocating 200 MB is seen
    as at least that), and the automatic model on the CPU is a measured one, kept for the
    potential."""
    potential = morse_potential()
    systems = SystemSet(potential.cutoff, 0.0, torch.device("cpu"))
    systems.extend(mixed_structures()[:2], [0, 1])
    batch = systems.batch(0, 2)

    def hungry(batch_, compute_stress=False):
        big = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB, touched
        out = potential(batch_)
        out["energy"] = out["energy"] + big[0]
        return out

    assert cpu_peak_bytes(hungry, batch, False) >= 1.9e8  # up to a few freed pages reused
    structures = mixed_structures()[:4]
    model = _auto_memory_model(potential, structures, 0.0, torch.device("cpu"))
    assert model is not CPU_MEMORY_MODEL
    assert cached_memory_model(potential, torch.device("cpu")) is not None


def test_memory_model_is_measured_on_the_largest_structures(monkeypatch):
    """Contract: gas-phase atoms first in a screening do not decide the memory model: it is
    measured on the largest structures; a measurement that resolves no cost per atom or edge
    (tiny structures only) gives the fixed CPU model and is not kept; a model measured on
    small structures is measured again for structures more than twice as large (an atom-only
    fit let 408 slabs into one 17 GiB forward pass); the measuring passes themselves stay
    within the memory at hand (two at least)."""
    from ase import Atoms
    from ase.build import fcc111

    from forcecalc.relax import relaxation

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    slab.pbc = True
    atoms = [Atoms("Cu", positions=[[5, 5, 5]], cell=[10, 10, 10], pbc=True)] * 8
    potential = morse_potential()
    cpu = torch.device("cpu")
    batches = relaxation.memory_sample_batches(potential, [*atoms, slab, slab], 0.0, cpu)
    assert max(b.n_atoms for b in batches) >= 2 * len(slab)  # the slabs are sampled
    with monkeypatch.context() as patched:  # a machine with little memory left: two batches
        patched.setattr(relaxation, "measurement_limit", lambda device: 1.0)
        few = relaxation.memory_sample_batches(potential, [*atoms, slab, slab], 0.0, cpu)
    assert [b.n_systems for b in few] == [1, 2]

    monkeypatch.setattr(relaxation, "cpu_peak_measurable", lambda: True)
    monkeypatch.setattr(relaxation, "cpu_peak_bytes", lambda potential, batch, grad: 0.0)
    fresh = morse_potential()
    assert relaxation._auto_memory_model(fresh, atoms, 0.0, cpu) == CPU_MEMORY_MODEL
    assert cached_memory_model(fresh, cpu) is None

    def measured(potential, batch, grad):
        return 1e6 + 1e4 * batch.n_edges

    monkeypatch.setattr(relaxation, "cpu_peak_bytes", measured)
    small = [Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]], cell=[10] * 3, pbc=True)] * 3
    relaxation._auto_memory_model(fresh, small, 0.0, cpu)
    assert cached_memory_model(fresh, cpu, largest_atoms=4) is not None
    assert cached_memory_model(fresh, cpu, largest_atoms=len(slab)) is None  # measured again


def test_the_measuring_passes_warn_of_no_structure_the_user_did_not_give(monkeypatch):
    """The memory model is measured on compressed copies of the largest structures too
    (lengths times DENSE_SAMPLE_SCALE): a max-neighbor cut in such a copy is no property of
    the user's structure. Bulk Ni (at most 18 neighbors within 4 Å; 54 in its 0.8-scaled
    copy) relaxed with the shipped spinconv-ec (its envelope makes it warn of a cut) under
    batch_size="auto" gets no warning, as with an integer batch size; a structure that is
    itself that dense still gets the warning, from the run's own evaluation."""
    import warnings

    from ase.build import bulk

    from forcecalc import ForcecalcWarning
    from forcecalc.checkpoint import load_checkpoint
    from forcecalc.relax import relax, relaxation

    def measured(potential, batch, grad):  # the forward runs (and may warn), a fixed peak
        with torch.set_grad_enabled(grad):
            potential(batch)
        return 1e6 + 1e3 * batch.n_atoms + 1e2 * batch.n_edges

    monkeypatch.setattr(relaxation, "cpu_peak_measurable", lambda: True)
    monkeypatch.setattr(relaxation, "cpu_peak_bytes", measured)
    nickel = bulk("Ni", "fcc", a=3.52, cubic=True).repeat(2)
    nickel.rattle(0.01, seed=0)
    dense = nickel.copy()
    dense.set_cell(nickel.cell * relaxation.DENSE_SAMPLE_SCALE, scale_atoms=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ForcecalcWarning)
        relax([nickel], load_checkpoint("spinconv-ec", device="cpu"), steps=0)
    with pytest.warns(ForcecalcWarning, match="more than 50 neighbors within 4 Å"):
        relax([dense], load_checkpoint("spinconv-ec", device="cpu"), steps=0)
