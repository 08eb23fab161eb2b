"""torch.compile of the models' forwards: the same numbers as the eager forward, never a
mode that would capture CUDA graphs of its own, never a change to the model passed in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc100
from devices import DEVICES
from ocp_fixtures import OCP_DATA

from forcecalc import load_calculator
from forcecalc.checkpoint import load_checkpoint
from forcecalc.compiled import compiled_blocks
from forcecalc.models.forcenet import InteractionBlock

FORCENET = OCP_DATA / "forcenet_small.pt"
SPINCONV = OCP_DATA / "spinconv_small_fc.pt"


def _slab():
    slab = fcc100("Cu", size=(2, 2, 2), vacuum=6.0)
    add_adsorbate(slab, "O", 1.6, "hollow")
    slab.positions += np.random.default_rng(0).normal(scale=0.01, size=slab.positions.shape)
    return slab


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_compiled_calculator_gives_the_eager_numbers(cuda_graph: bool, device: str) -> None:
    """With ``compile_mode`` (the blocks compiled with dynamic shapes, or the replayed
    fixed-shape forward with static ones, captured in one CUDA graph on CUDA) the
    calculator's energy and forces are the eager calculator's to rounding (float64), here and
    after the atoms moved."""
    potential = load_checkpoint(FORCENET, device=device, dtype="float64")
    eager = load_calculator(potential)
    compiled = load_calculator(potential, cuda_graph=cuda_graph, compile_mode="default")
    atoms = _slab()
    for _ in range(2):
        np.testing.assert_allclose(
            compiled.get_forces(atoms), eager.get_forces(atoms), rtol=0, atol=1e-10
        )
        assert compiled.get_potential_energy(atoms) == pytest.approx(
            eager.get_potential_energy(atoms), abs=1e-10
        )
        atoms.positions[0] += 0.05
    if cuda_graph:
        assert compiled.replay.captures == (1 if device == "cuda" else 0)


def test_compile_mode_refuses_modes_that_capture_their_own_graphs() -> None:
    """``reduce-overhead`` and ``max-autotune`` capture CUDA graphs themselves, which clashes
    with the calculator's own replay: refused by name, as is a misspelt mode."""
    for mode in ("reduce-overhead", "max-autotune", "fast"):
        with pytest.raises(ValueError, match="compile_mode must be one of default"):
            load_calculator(FORCENET, device="cpu", compile_mode=mode)


def test_compiled_blocks_leaves_the_model_passed_in_unchanged() -> None:
    """``compiled_blocks`` compiles the blocks of a copy: the model passed in keeps its eager
    blocks; a module without SpinConv or ForceNet blocks is refused."""
    potential = load_checkpoint(FORCENET, device="cpu")
    copy = compiled_blocks(potential)
    blocks = [m for m in potential.modules() if isinstance(m, InteractionBlock)]
    copied = [m for m in copy.modules() if isinstance(m, InteractionBlock)]
    assert blocks and len(copied) == len(blocks)
    assert all("forward" not in vars(block) for block in blocks)
    assert all("forward" in vars(block) for block in copied)
    with pytest.raises(ValueError, match="holds no SpinConv or ForceNet blocks"):
        compiled_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("envelope", [False, True])
def test_the_force_centric_fixed_shape_forward_compiles_as_one_graph(envelope: bool) -> None:
    """What ``compile_mode`` compiles for the CUDA-graph replay, SpinConv's fixed-shape
    forward (force-centric, with and without the envelope), is one graph: no graph break
    (each would split the compiled replay into pieces run eagerly in between)."""
    import torch._dynamo

    from forcecalc.graph.batch import Batch

    potential = load_checkpoint(SPINCONV, device="cpu", dtype="float32", envelope=envelope)
    model = potential.model
    batch = Batch.from_atoms([_slab()], cutoff=model.cutoff, dtype=torch.float32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.fixed_shape_forward)(model.fixed_shape_inputs(batch))
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
