"""The ``forcecalc`` command: what a user types and reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from ase.io import read, write
from collisions import head_on_pair
from ocp_fixtures import OCP_DATA

import forcecalc
from forcecalc.cli import build_parser, main

SPINCONV_EC = OCP_DATA / "spinconv_small_ec.pt"


def test_version_and_module_entry_point() -> None:
    """`python -m forcecalc --version` prints the package version."""
    out = subprocess.run(
        [sys.executable, "-m", "forcecalc", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"forcecalc {forcecalc.__version__}"


def test_info_describes_a_checkpoint(capsys) -> None:
    """`forcecalc info CHECKPOINT` prints the model, cutoff and normalizers as JSON."""
    assert main(["info", str(OCP_DATA / "forcenet_small.pt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "forcenet" and report["cutoff"] == 6.0
    assert report["format"] == "ocp"


def test_info_without_checkpoint_lists_models(capsys) -> None:
    """`forcecalc info` shows the version and the downloadable OCP checkpoints."""
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert forcecalc.__version__ in out and "SpinConv-S2EF-OC20-All" in out


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["relax"], ["(default: 0.05)", "(default: 300)", "(default: BFGS)", "0.5 batched"]),
        (["md"], ["(default: langevin)", "(default: 300.0)", "(default: 100)"]),
        (["eval", "s2ef"], ["(default: all)"]),
        (["eval", "is2rs"], ["(default: lbfgs)", "(default: all)", "(default: 300)"]),
        (["data", "oc20emt"], ["(default: 0)"]),
    ],
)
def test_help_shows_the_defaults(capsys, command: list[str], shown: list[str]) -> None:
    """Every subcommand's --help says what each option defaults to (README: `forcecalc
    COMMAND --help` lists every option with its default)."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in shown:
        assert expected in text


def test_optimizer_names_take_any_case() -> None:
    """`relax --optimizer lbfgs` and `eval --optimizer LBFGS` name the same optimizer as the
    canonical spelling of each command (the Python `relax()` takes any case too)."""
    from forcecalc.cli import build_parser

    parser = build_parser()
    relax = ["relax", "in.xyz", "--model", "m.pt", "--optimizer", "lbfgs"]
    assert parser.parse_args(relax).optimizer == "LBFGS"
    evaluation = ["eval", "is2rs", "--model", "m.pt", "--data", "x.h5", "--optimizer", "LBFGS"]
    assert parser.parse_args(evaluation).optimizer == "lbfgs"


def test_eval_options_belong_to_their_task(capsys) -> None:
    """`eval s2ef` takes no system sample nor relaxation option and `eval is2rs` no frame
    sample (each was silently ignored): they are usage errors naming the option (exit code
    2); the README's `forcecalc eval` commands parse."""
    from forcecalc.cli import build_parser

    parser = build_parser()
    common = ["--model", "m.pt", "--data", "x.h5"]
    others = [("s2ef", o) for o in ("--max-systems", "--optimizer", "--fmax", "--steps")]
    for task, option in [*others, ("is2rs", "--max-frames")]:
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["eval", task, *common, option, "3"])
        assert stop.value.code == 2
        assert f"unrecognized arguments: {option} 3" in capsys.readouterr().err
    readme = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    commands = [line.split()[1:] for line in readme if line.startswith("forcecalc eval ")]
    runnable = [argv for argv in commands if "s2ef|is2rs" not in argv]  # not the synopsis
    assert {argv[1] for argv in runnable} == {"s2ef", "is2rs"}
    for argv in runnable:
        assert parser.parse_args(argv).task == argv[1]


def test_convert_writes_our_format(tmp_path: Path) -> None:
    """`forcecalc convert` turns an OCP checkpoint into forcecalc's format."""
    out = tmp_path / "converted.pt"
    assert main(["convert", str(OCP_DATA / "spinconv_small_fc.pt"), str(out)]) == 0
    data = torch.load(out, weights_only=True)
    assert data["format"] == "forcecalc" and data["model"] == "spinconv"


def test_errors_are_one_line_not_tracebacks(capsys) -> None:
    """A missing checkpoint is reported as a one-line error with exit code 2."""
    assert main(["info", "no-such-model"]) == 2
    assert "no checkpoint file or known name" in capsys.readouterr().err


def test_relax_writes_structures_and_a_table(tmp_path: Path, capsys) -> None:
    """`forcecalc relax` relaxes every structure, honours --fix-below and writes the result."""
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 2.0, "fcc")
    write(tmp_path / "in.extxyz", [slab, slab])
    z_bottom = slab.positions[:4, 2].max() + 0.1
    code = main(
        [
            "relax",
            str(tmp_path / "in.extxyz"),
            "--model",
            str(SPINCONV_EC),
            "--dtype",
            "float64",
            "--fix-below",
            str(z_bottom),
            "--steps",
            "3",
            "--out",
            str(tmp_path / "out.extxyz"),
        ]
    )
    assert code == 0
    relaxed = read(tmp_path / "out.extxyz", index=":")
    assert len(relaxed) == 2
    fixed = slab.positions[:, 2] < z_bottom
    assert abs(relaxed[0].positions[fixed] - slab.positions[fixed]).max() < 1e-6
    assert isinstance(relaxed[0].constraints[0], FixAtoms)
    assert "E_final" in capsys.readouterr().out


@pytest.mark.parametrize("batched", [False, True])
def test_relax_forces_option_loads_the_checkpoint_with_it(tmp_path: Path, batched: bool) -> None:
    """`forcecalc relax --forces conservative` relaxes with the energy's gradient of an OCP
    energy-centric checkpoint (as `md --forces` does): its output forces are the
    conservative model's at the final positions, not the checkpoint's own compat ones."""
    from forcecalc.calculator import load_calculator

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 2.0, "fcc")
    write(tmp_path / "in.extxyz", slab)
    command = ["relax", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC)]
    command += ["--dtype", "float64", "--steps", "2", "--out", str(tmp_path / "out.extxyz")]
    assert main([*command, "--forces", "conservative", *(["--batched"] if batched else [])]) == 0
    [relaxed] = read(tmp_path / "out.extxyz", index=":")
    forces = {}
    for option in ("conservative", "compat"):
        atoms = relaxed.copy()
        atoms.calc = load_calculator(str(SPINCONV_EC), dtype="float64", forces=option)
        forces[option] = atoms.get_forces()
    # the file's positions are rounded (~5e-9 Å), where the small test model's curvature
    # (~2000 eV/Å²) moves forces by ~1e-5 eV/Å; compat ones differ by ~0.4
    np.testing.assert_allclose(relaxed.get_forces(), forces["conservative"], atol=1e-4)
    assert np.abs(forces["compat"] - forces["conservative"]).max() > 1e-2


def test_ase_relaxation_holds_blas_to_one_thread_on_the_cpu(tmp_path: Path, monkeypatch) -> None:
    """ASE's BFGS calls numpy's threaded BLAS every step, whose threads then compete with
    torch's for the cores: `forcecalc relax` runs it with one BLAS thread on the CPU, and
    gives the threads back afterwards."""
    from ase.optimize import BFGS
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    seen: list[list[int]] = []
    step = BFGS.step
    monkeypatch.setattr(
        BFGS, "step", lambda self, *a: (seen.append(blas_threads()), step(self, *a))
    )
    write(tmp_path / "in.extxyz", fcc111("Cu", size=(2, 2, 2), vacuum=5.0))
    with threadpool_limits(2, user_api="blas"):
        before = blas_threads()
        assert main(["relax", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC)]) == 0
        assert blas_threads() == before
    assert seen and all(threads == [1] * len(before) for threads in seen)


def test_md_logs_energies(tmp_path: Path, capsys) -> None:
    """`forcecalc md` runs the integrator and logs energy and temperature."""
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    write(tmp_path / "in.extxyz", slab)
    code = main(
        [
            "md",
            str(tmp_path / "in.extxyz"),
            "--model",
            str(SPINCONV_EC),
            "--forces",
            "conservative",
            "--steps",
            "4",
            "--log-interval",
            "2",
            "--out",
            str(tmp_path / "md.traj"),
        ]
    )
    assert code == 0
    assert len(read(tmp_path / "md.traj", index=":")) == 3
    captured = capsys.readouterr()
    assert "E_total" in captured.out and "note" not in captured.err


def test_md_with_direct_forces_says_energy_is_not_conserved(tmp_path: Path, capsys) -> None:
    """`forcecalc md` with a model whose forces are no energy gradient (direct forces, or an
    OCP energy-centric checkpoint's compat forces) runs, with a note that its dynamics conserve
    no energy (the README's advice, where a user running MD meets it); `--forces
    conservative` gives the full gradient, without the note."""
    write(tmp_path / "in.extxyz", fcc111("Cu", size=(2, 2, 2), vacuum=5.0))
    command = ["md", str(tmp_path / "in.extxyz"), "--steps", "1", "--model"]
    assert main([*command, str(OCP_DATA / "forcenet_small.pt")]) == 0
    assert "predicts forces directly" in capsys.readouterr().err
    assert main([*command, str(SPINCONV_EC)]) == 0
    assert "add --forces conservative" in capsys.readouterr().err
    assert main([*command, str(SPINCONV_EC), "--forces", "conservative"]) == 0
    assert "note" not in capsys.readouterr().err


def test_md_that_fails_keeps_the_old_trajectory_and_its_frames(tmp_path: Path, monkeypatch) -> None:
    """`md --out OUT` writes OUT.part and renames it at the end: a run that fails midway
    leaves an earlier OUT untouched and its own frames in OUT.part, and a run that finishes
    leaves OUT alone (no .part)."""
    from forcecalc.calculator import ForceCalculator

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    write(tmp_path / "in.extxyz", slab)
    out = tmp_path / "md.traj"
    command = ["md", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC), "--out", str(out)]
    command += ["--steps", "6", "--log-interval", "2"]
    assert main(command) == 0
    assert len(read(out, index=":")) == 4 and not Path(f"{out}.part").exists()
    before = out.read_bytes()
    calculate = ForceCalculator.calculate
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise ValueError("simulated failure")
        return calculate(self, *args, **kwargs)

    monkeypatch.setattr(ForceCalculator, "calculate", failing)
    assert main(command) == 1  # a run that failed midway
    assert out.read_bytes() == before
    assert len(read(f"{out}.part", index=":")) >= 1


def test_md_with_cuda_graph_and_skin_follows_the_same_trajectory(tmp_path: Path) -> None:
    """`md --cuda-graph --skin` (the fixed-shape forward; a graph on CUDA) integrates the same
    trajectory as plain `md` (float64, seeded Langevin); `relax --batched --cuda-graph` is a
    clear error."""
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    write(tmp_path / "in.extxyz", slab)
    frames = []
    for extra in ([], ["--cuda-graph", "--skin", "0.5"]):
        out = tmp_path / f"md{len(extra)}.traj"
        common = ["--model", str(SPINCONV_EC), "--dtype", "float64", "--steps", "6"]
        common += ["--log-interval", "2"]
        assert main(["md", str(tmp_path / "in.extxyz"), *common, "--out", str(out), *extra]) == 0
        frames.append(read(out, index=":"))
    assert len(frames[0]) == len(frames[1]) > 1
    for plain, graphed in zip(*frames, strict=True):
        np.testing.assert_allclose(graphed.positions, plain.positions, rtol=0, atol=1e-10)
    relax = ["relax", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC)]
    assert main([*relax, "--batched", "--cuda-graph"]) == 2


def test_sharded_batched_relax_merges_back_in_order(tmp_path: Path, capsys) -> None:
    """`relax --batched --shard I/N` on every shard, then `merge`: all inputs, in input order;
    the empty output of a shard beyond the inputs merges as nothing, and a missing shard
    output (even the last one) is an error, not a partial file."""
    slabs = []
    for size in (1, 2, 3):
        slab = fcc111("Cu", size=(2, 2, size + 1), vacuum=5.0)
        add_adsorbate(slab, "O", 2.0, "fcc")
        slabs.append(slab)
    write(tmp_path / "in.extxyz", slabs)
    for shard in ("1/4", "2/4", "3/4", "4/4"):
        code = main(
            [
                "relax",
                str(tmp_path / "in.extxyz"),
                "--model",
                str(SPINCONV_EC),
                "--batched",
                "--steps",
                "2",
                "--shard",
                shard,
                "--out",
                str(tmp_path / f"out{shard[0]}.extxyz"),
            ]
        )
        assert code == 0
    assert len(read(tmp_path / "out1.extxyz", index=":")) == 1
    assert (tmp_path / "out4.extxyz").stat().st_size == 0  # the 4th of 4 shards of 3 inputs
    outputs = [str(tmp_path / f"out{k}.extxyz") for k in (2, 4, 1, 3)]
    assert main(["merge", str(tmp_path / "merged.extxyz"), *outputs]) == 0
    merged = read(tmp_path / "merged.extxyz", index=":")
    assert [len(a) for a in merged] == [len(s) for s in slabs]
    assert [a.info["input_index"] for a in merged] == [0, 1, 2]
    capsys.readouterr()
    for left_out in (outputs[0], outputs[3]):  # the middle and the last input
        rest = [path for path in outputs if path != left_out]
        assert main(["merge", str(tmp_path / "partial.extxyz"), *rest]) == 2
        assert "are missing from the shard outputs" in capsys.readouterr().err
    assert not (tmp_path / "partial.extxyz").exists()


@pytest.mark.parametrize("batched", [False, True])
def test_relax_trajectory_holds_every_step_of_each_structure(tmp_path: Path, batched: bool) -> None:
    """`relax --trajectory DIR` writes each relaxed structure's path to DIR/INDEX.traj (its
    place in INPUT, also under --shard): the input first, then every step, each frame with
    its model energy and forces, the last frame the structure written to --out; the same
    frames one by one (ASE's optimizer) and batched (the engine, FixAtoms honoured), each
    with the input's info (the run's outcome, relax_*, only on the output); a file where the
    folder should be is refused before any work."""
    from ase.io import Trajectory

    from forcecalc.calculator import load_calculator

    slabs = []
    for size in (1, 2):
        slab = fcc111("Cu", size=(2, 2, size + 1), vacuum=5.0)
        add_adsorbate(slab, "O", 2.0, "fcc")
        slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
        slabs.append(slab)
    write(tmp_path / "in.extxyz", slabs)
    slabs = read(tmp_path / "in.extxyz", index=":")  # as relax reads them
    folder = tmp_path / "paths"
    command = ["relax", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC)]
    command += ["--dtype", "float64", "--optimizer", "fire", "--steps", "4"]
    command += ["--shard", "2/2", "--trajectory", str(folder), "--out", str(tmp_path / "o.traj")]
    assert main([*command, *(["--batched"] if batched else [])]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["1.traj"]  # shard 2 of 2: input 1
    [relaxed] = read(tmp_path / "o.traj", index=":")
    frames = list(Trajectory(folder / "1.traj"))
    assert len(frames) == relaxed.info["relax_steps"] + 1 == 5
    assert "relax_initial_energy" in relaxed.info
    assert all(frame.info == {**frames[0].info, "input_index": 1} for frame in frames)
    assert not any(key.startswith("relax_") for key in frames[0].info)
    np.testing.assert_array_equal(frames[0].positions, slabs[1].positions)
    np.testing.assert_allclose(frames[-1].positions, relaxed.positions, atol=1e-10)
    calc = load_calculator(str(SPINCONV_EC), dtype="float64")
    for frame in (frames[0], frames[2]):
        atoms = frame.copy()
        atoms.calc = calc
        assert frame.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(
            frame.get_forces(apply_constraint=False), atoms.get_forces(apply_constraint=False),
            atol=1e-7,
        )  # fmt: skip
    assert np.abs(frames[-1].positions[:4] - slabs[1].positions[:4]).max() == 0.0
    (tmp_path / "file").write_text("")
    for bad in (str(tmp_path / "file"), ""):
        assert main([*command[:-3], bad, *command[-2:]]) == 2
    assert main([*command[:-1], str(folder / "1.traj")]) == 2  # --out over a path


@pytest.mark.parametrize("batched", [False, True])
def test_relax_trajectory_keeps_the_frames_before_a_failure(
    tmp_path: Path, batched: bool, monkeypatch
) -> None:
    """A model that fails partway (non-finite from its fourth evaluation on): `relax
    --trajectory` keeps the three frames evaluated before, one by one as batched."""
    from ase.io import Trajectory

    from forcecalc.checkpoint import Potential

    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 2.0, "fcc")
    write(tmp_path / "in.extxyz", slab)
    plain, calls = Potential.forward, []

    def failing(self: Potential, batch: Any, **options: Any) -> dict:
        calls.append(1)
        out = plain(self, batch, **options)
        return out if len(calls) < 4 else {k: v * float("nan") for k, v in out.items()}

    monkeypatch.setattr(Potential, "forward", failing)
    command = ["relax", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC), "--fmax", "0"]
    command += ["--optimizer", "fire", "--steps", "5", "--trajectory", str(tmp_path / "paths")]
    command += ["--batched", "--batch-size", "1"] if batched else []  # (no memory measurement)
    assert main(command) == 1
    assert len(list(Trajectory(tmp_path / "paths" / "0.traj"))) == 3


def test_eval_prints_the_papers_tables(tmp_path: Path, capsys) -> None:
    """`forcecalc eval s2ef|is2rs` on an OC20-EMT split prints model and median-baseline rows
    and writes JSON whose IS2RE baseline equals the training median's error."""
    import numpy as np

    from forcecalc.data import open_dataset
    from forcecalc.data.oc20emt import generate

    generate("tiny", tmp_path / "data", seed=3, workers=1, progress=False)
    split, train = str(tmp_path / "data" / "test_id.h5"), str(tmp_path / "data" / "train.h5")
    common = ["--model", str(OCP_DATA / "forcenet_small.pt"), "--data", split, "--train", train]
    assert (
        main(["eval", "s2ef", *common, "--max-frames", "10", "--out", str(tmp_path / "s.json")])
        == 0
    )
    s2ef = json.loads((tmp_path / "s.json").read_text())["test_id"]
    assert s2ef["model"]["frames"] == 10 and set(s2ef["median"]) >= {"forces_mae", "efwt"}
    code = main(
        [
            "eval",
            "is2rs",
            *common,
            "--max-systems",
            "2",
            "--steps",
            "3",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    row = json.loads((tmp_path / "r.json").read_text())["test_id"]
    assert row["systems"] == min(2, open_dataset(split).n_systems)
    assert 0 <= row["is2rs"]["adwt"] <= 1 and "afbt" in row["is2rs"]
    relaxed = open_dataset(split).systems["relaxed_energy"]
    median = np.median(open_dataset(train).systems["relaxed_energy"])
    assert row["median_is2re"]["energy_mae"] == pytest.approx(np.abs(relaxed - median).mean())
    out = capsys.readouterr().out
    assert "force MAE" in out and "ADwT" in out


@pytest.mark.parametrize("batched", [False, True])
def test_relax_with_compile_gives_the_eager_structures(
    tmp_path: Path, batched: bool, monkeypatch
) -> None:
    """`forcecalc relax --compile` (ASE's optimizer with compiled blocks, or the batched
    engine with them) compiles the model once and relaxes to the positions of the eager run,
    to rounding (float64)."""
    import forcecalc.calculator
    import forcecalc.compiled

    modes = []
    compile_blocks = forcecalc.compiled.compiled_blocks

    def recorded(module, mode="default"):
        modes.append(mode)
        return compile_blocks(module, mode)

    monkeypatch.setattr(forcecalc.compiled, "compiled_blocks", recorded)
    monkeypatch.setattr(forcecalc.calculator, "compiled_blocks", recorded)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 2.0, "fcc")
    write(tmp_path / "in.extxyz", [slab])
    model = str(OCP_DATA / "forcenet_small.pt")
    common = ["--model", model, "--dtype", "float64", "--steps", "4", "--device", "cpu"]
    common += ["--batched"] if batched else []
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = str(tmp_path / f"{name}.extxyz")
        assert main(["relax", str(tmp_path / "in.extxyz"), *common, *extra, "--out", out]) == 0
    assert modes == ["default"]
    eager, compiled = read(tmp_path / "eager.extxyz"), read(tmp_path / "compiled.extxyz")
    assert abs(compiled.positions - eager.positions).max() < 1e-8
    assert abs(compiled.positions - slab.positions).max() > 1e-3  # the atoms did move


def _nan_checkpoint(path: Path) -> Path:
    """The small energy-centric SpinConv with one weight NaN: every output is NaN."""
    from forcecalc import load_checkpoint, save_checkpoint

    potential = load_checkpoint(SPINCONV_EC, device="cpu")
    with torch.no_grad():
        next(potential.parameters()).fill_(float("nan"))
    return save_checkpoint(potential, path)


@pytest.mark.parametrize("batched", [False, True])
def test_relax_of_a_failing_model_says_so_and_exits_1(
    tmp_path: Path, capsys, batched: bool
) -> None:
    """A model whose output is NaN: `relax` (one by one or batched) writes every structure
    with ``info['relax_error']``, names the failed ones on stderr and exits with 1, not a
    traceback (one by one) nor a silent 0 (batched); with --trajectory, no file for a
    structure without a single evaluated frame."""
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    write(tmp_path / "in.extxyz", [slab, slab])
    model = _nan_checkpoint(tmp_path / "nan.pt")
    out = tmp_path / "out.extxyz"
    command = ["relax", str(tmp_path / "in.extxyz"), "--model", str(model), "--steps", "3"]
    command += ["--trajectory", str(tmp_path / "paths")]
    code = main([*command, "--out", str(out), *(["--batched"] if batched else [])])
    assert not list(tmp_path.glob("paths/*"))
    assert code == 1
    captured = capsys.readouterr()
    assert "failed" in captured.out
    assert "input structure(s) [0, 1] (2 of 2) failed" in captured.err
    relaxed = read(out, index=":")
    assert len(relaxed) == 2 and all("not finite" in a.info["relax_error"] for a in relaxed)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_eval_of_a_failing_model_counts_failures_in_strict_json(tmp_path: Path, capsys) -> None:
    """`eval` with a model whose outputs are NaN: s2ef and is2rs name the failed frames and
    systems in a warning, leave them out of the scores and count them (the table's and the
    JSON's "failed"), with no score where none is left (n/a; null): never NaN or Infinity
    tokens in the --out file (strict JSON readers refuse them), never the ADwT of the
    unrelaxed initial structure as the model's, and no numpy RuntimeWarning on the way; the
    results are written, and the exit code is 1, as `relax`'s when a structure failed."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from forcecalc.data.store import FrameBatch, write_dataset

    frames = [fcc111("Cu", size=(2, 2, 2), vacuum=5.0) for _ in range(2)]
    for atoms in frames:
        atoms.info.clear()
        atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((8, 3)))
    table = {"initial_frame": [0], "relaxed_frame": [1], "relaxed_energy": [0.0]}
    split = write_dataset(
        tmp_path / "split.h5", FrameBatch.from_atoms(frames, system=[0, 0]), table
    )
    model = str(_nan_checkpoint(tmp_path / "nan.pt"))

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    rows = {}
    for task, what, failed in (("s2ef", "frames", "2 of 2"), ("is2rs", "systems", "1 of 1")):
        out = tmp_path / f"{task}.json"
        assert main(["eval", task, "--model", model, "--data", str(split), "--out", str(out)]) == 1
        captured = capsys.readouterr()
        assert f"split.h5: {failed} {what} failed and are left out of the scores" in captured.err
        last = captured.err.splitlines()[-1]
        assert last.startswith(f"forcecalc: error: {what} failed (split: {failed})")
        assert "n/a" in captured.out and "failed" in captured.out
        rows[task] = json.loads(out.read_text(), parse_constant=refuse)["split"]
    assert rows["s2ef"]["model"] == {
        "energy_mae": None,
        "forces_mae": None,
        "forces_cos": None,
        "efwt": None,
        "frames": 2,
        "failed": 2,
    }
    assert rows["is2rs"]["failed"] == 1 and rows["is2rs"]["is2rs"] == {"adwt": None, "afbt": None}
    assert rows["is2rs"]["is2re"] == {"energy_mae": None, "ewt": None}


def test_md_of_a_failing_model_is_one_line(tmp_path: Path, capsys) -> None:
    """A model whose output is NaN: `md` ends with one line on stderr and exit code 1."""
    write(tmp_path / "in.extxyz", fcc111("Cu", size=(2, 2, 2), vacuum=5.0))
    model = _nan_checkpoint(tmp_path / "nan.pt")
    code = main(["md", str(tmp_path / "in.extxyz"), "--model", str(model), "--steps", "2"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("forcecalc: error: ") and "not finite" in err[-1]


def test_md_that_brings_atoms_together_is_a_failed_run(tmp_path: Path, capsys) -> None:
    """Two Cu atoms flying head-on meet within 0.01 Å in the first step: `md` ends with one
    line naming the step and exit code 1 (a run that went wrong, not bad input: exit code 2
    is for those, as for the same pair given overlapping)."""
    pair = head_on_pair("Cu2", gap=1.0, step=0.5)
    write(tmp_path / "pair.extxyz", pair)
    command = ["md", str(tmp_path / "pair.extxyz"), "--model", str(SPINCONV_EC)]
    options = ["--integrator", "verlet", "--timestep", "0.5", "--steps", "3", "--keep-momenta"]
    assert main([*command, *options]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("forcecalc: error: md stopped in step 1: the structure (Cu2): atoms 0")
    pair.positions[1] = pair.positions[0]
    write(tmp_path / "pair.extxyz", pair)
    assert main([*command, *options]) == 2
    assert "atoms 0 and 1 are 0 Å apart" in capsys.readouterr().err


def test_options_that_do_nothing_here_get_a_note(tmp_path: Path, capsys) -> None:
    """`relax --cuda-graph` off a GPU (no CUDA graph there, the same numbers) and `relax
    --shard I/N` without `--out` (nothing saved for merge) run, with one note each on stderr."""
    write(tmp_path / "two.extxyz", [fcc111("Cu", size=(2, 2, 2), vacuum=5.0)] * 2)
    command = ["relax", str(tmp_path / "two.extxyz"), "--model", str(SPINCONV_EC), "--steps", "1"]
    assert main([*command, "--cuda-graph"]) == 0
    assert "note: --cuda-graph on cpu: no CUDA graph there" in capsys.readouterr().err
    assert main([*command, "--shard", "1/2"]) == 0
    assert "note: --shard 1/2 without --out: this shard's results are printed, not saved" in (
        capsys.readouterr().err
    )


def test_md_output_errors_after_the_run_are_not_a_stopped_run(tmp_path: Path, monkeypatch, capsys):
    """A ValueError while writing `md --out` after all steps ran is reported as it is (exit
    code 2), not as a run that "stopped in step N" (exit code 1, for atoms that met midway)."""
    import forcecalc.cli

    def refused(*args, **kwargs):
        raise ValueError("simulated: cannot write")

    write(tmp_path / "in.extxyz", fcc111("Cu", size=(2, 2, 2), vacuum=5.0))
    monkeypatch.setattr(forcecalc.cli, "_write_structures", refused)
    command = ["md", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC), "--steps", "2"]
    assert main([*command, "--out", str(tmp_path / "md.extxyz")]) == 2
    err = capsys.readouterr().err
    assert "simulated: cannot write" in err and "stopped in step" not in err


def test_md_keep_momenta_continues_from_the_stored_momenta(tmp_path: Path) -> None:
    """`md --keep-momenta` starts from the momenta stored in the input (an NVE run continues
    where the last frame of an earlier run's output stopped); without it they are drawn
    at --temperature."""
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    momenta = np.random.default_rng(0).normal(0.0, 0.3, size=(len(slab), 3))
    slab.set_momenta(momenta)
    write(tmp_path / "in.extxyz", slab)
    command = ["md", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC), "--steps", "0"]
    for flag, out in (("--keep-momenta", "kept.traj"), ("--seed=1", "drawn.traj")):
        assert main([*command, flag, "--dtype", "float64", "--out", str(tmp_path / out)]) == 0
    stored = read(tmp_path / "in.extxyz").get_momenta()  # extxyz keeps 8 decimals
    np.testing.assert_array_equal(read(tmp_path / "kept.traj").get_momenta(), stored)
    assert not np.allclose(read(tmp_path / "drawn.traj").get_momenta(), momenta)


def test_merge_refuses_shards_of_other_inputs_or_models(tmp_path: Path, capsys) -> None:
    """`merge` puts together only the shards of one run: outputs of another input file (same
    size) or of other weights are refused, naming what differs; the same weights named two
    ways (shipped name, path) are one model, and the provenance survives extxyz and traj."""
    slabs = [fcc111("Cu", size=(2, 2, n), vacuum=5.0) for n in (2, 3)]
    write(tmp_path / "a.extxyz", slabs)
    write(tmp_path / "b.extxyz", slabs[::-1])
    fc_path = str(forcecalc.hub.resolve_checkpoint("spinconv-fc"))

    def shard(source: str, model: str, index: int, suffix: str = "extxyz") -> str:
        out = str(tmp_path / f"{source}_{Path(model).stem}_{index}.{suffix}")
        command = ["relax", str(tmp_path / f"{source}.extxyz"), "--model", model, "--batched"]
        assert main([*command, "--steps", "1", "--shard", f"{index}/2", "--out", out]) == 0
        return out

    merged = str(tmp_path / "m.extxyz")
    capsys.readouterr()
    assert main(["merge", merged, shard("a", "spinconv-fc", 1), shard("b", "spinconv-fc", 2)])
    assert "different input files" in capsys.readouterr().err
    assert main(["merge", merged, shard("a", "spinconv-fc", 1), shard("a", str(SPINCONV_EC), 2)])
    assert "different model weights" in capsys.readouterr().err
    assert (
        main(["merge", merged, shard("a", "spinconv-fc", 1), shard("a", fc_path, 2, "traj")]) == 0
    )
    assert [a.info["input_index"] for a in read(merged, index=":")] == [0, 1]


def test_merge_refuses_shards_of_other_settings(tmp_path: Path, capsys) -> None:
    """`merge` refuses shards computed with other settings that decide the numbers (compat
    and conservative forces have different minima; another precision, kernels, threshold,
    optimizer, step limit or fixed layer gives other structures), naming the option and both
    values; shards of the same settings merge, each structure keeping them in its info."""
    write(tmp_path / "in.extxyz", [fcc111("Cu", size=(2, 2, n), vacuum=5.0) for n in (2, 3)])

    def shard(index: int, *options: str) -> str:
        out = str(tmp_path / f"{index}{''.join(options)}.extxyz")
        command = ["relax", str(tmp_path / "in.extxyz"), "--model", str(SPINCONV_EC)]
        command += ["--steps", "1", "--shard", f"{index}/2", "--out", out, *options]
        assert main(command) == 0
        return out

    first, merged = shard(1), str(tmp_path / "merged.extxyz")
    for option, value, values in (
        ("--forces", "conservative", "(compat, conservative)"),
        ("--dtype", "float64", "(float32, float64)"),
        ("--fmax", "0.01", "(0.01, 0.05)"),
        ("--optimizer", "FIRE", "(BFGS, FIRE)"),
        ("--steps", "2", "(1, 2)"),
        ("--fix-below", "6.0", "(6.0, none)"),
    ):
        capsys.readouterr()
        assert main(["merge", merged, first, shard(2, option, value)]) == 2
        assert f"come from different {option} {values}" in capsys.readouterr().err
    assert main(["merge", merged, first, shard(2)]) == 0
    settings = {"model_forces": "compat", "model_dtype": "float32", "run_optimizer": "BFGS"}
    for atoms in read(merged, index=":"):
        assert {key: atoms.info[key] for key in settings} == settings
        assert atoms.info["run_fmax"] == 0.05 and atoms.info["run_max_steps"] == 1


def test_relax_of_an_empty_input_is_an_error(tmp_path: Path, capsys) -> None:
    """`relax` of a file without structures (an ASE database without rows) is an error, not
    an empty output (a shard of it may be empty: that stays allowed)."""
    from ase.db import connect

    with connect(tmp_path / "empty.db") as db:
        db.delete([db.write(fcc111("Cu", size=(1, 1, 2), vacuum=5.0))])
    assert main(["relax", str(tmp_path / "empty.db"), "--model", str(SPINCONV_EC)]) == 2
    assert "holds no structures" in capsys.readouterr().err


def _relaxed_both_ways(tmp_path: Path, capsys, structures: list, *options: str) -> list:
    """``relax`` of ``structures`` one by one and ``--batched`` (float64, ``options``): both
    exit with 1 naming input structure 0 as failed; the two outputs read back."""
    write(tmp_path / "in.extxyz", structures)
    command = ["relax", str(tmp_path / "in.extxyz"), "--dtype", "float64", *options]
    outputs, rows = [], []
    for mode in ([], ["--batched"]):
        out = tmp_path / f"out{len(mode)}.extxyz"
        assert main([*command, "--out", str(out), *mode]) == 1
        captured = capsys.readouterr()
        assert f"input structure(s) [0] (1 of {len(structures)}) failed" in captured.err
        rows.append([line for line in captured.out.splitlines() if line.startswith("    0 ")])
        outputs.append(read(out, index=":"))
    assert rows[0] == rows[1]  # the same table row
    return outputs


def _assert_same_outputs(one: list, batched: list) -> None:
    """The two modes' structures: the same positions, outcome (info), results (names and
    values, NaN where the model gave NaN)."""
    keys = ("relax_steps", "relax_converged", "relax_error", "relax_initial_energy")
    for a, b in zip(one, batched, strict=True):
        assert [a.info.get(key) for key in keys[:3]] == [b.info.get(key) for key in keys[:3]]
        np.testing.assert_allclose(a.info[keys[3]], b.info[keys[3]], rtol=0, atol=1e-8)
        np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=1e-8)
        assert set(a.calc.results) == set(b.calc.results)
        for name, value in a.calc.results.items():
            np.testing.assert_allclose(value, b.calc.results[name], rtol=0, atol=1e-8)


# ASE's LBFGS divides by the zero change of the forces: its numpy warnings are the breakdown
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_relax_one_by_one_ends_an_optimizer_breakdown_as_batched(tmp_path: Path, capsys) -> None:
    """ASE's LBFGS on a lone atom (zero forces) makes a step that is not finite: one by one,
    that structure ends as the batched engine ends it, at its last finite positions with
    their energy and forces (not NaN positions without results), relax_steps counting the
    steps evaluated, relax_error naming the cause (the LBFGS step, not the calculator's
    input check); the other structure is relaxed and written, the same in both modes."""
    from ase import Atoms

    lone = Atoms("Cu", positions=[[5.0, 5.0, 5.0]], cell=[10, 10, 10], pbc=True)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    options = ["--model", str(SPINCONV_EC), "--optimizer", "lbfgs", "--fmax", "0", "--steps", "3"]
    one, batched = _relaxed_both_ways(tmp_path, capsys, [lone, slab], *options)
    assert one[0].info["relax_error"] == "the lbfgs step was not finite (NaN or inf)"
    assert one[0].info["relax_steps"] == 1 and one[1].info["relax_steps"] == 3
    np.testing.assert_array_equal(one[0].positions, lone.positions)
    assert np.isfinite(one[0].get_potential_energy()) and "relax_error" not in one[1].info
    _assert_same_outputs(one, batched)


def test_a_model_failing_at_once_is_reported_alike_both_ways(tmp_path: Path, capsys) -> None:
    """A model whose first output is NaN: one by one and --batched print the same table row
    (failed, and why) and write the same structures: the input positions, 0 steps, not
    converged, the same relax_error and the model's NaN energy and forces (one by one wrote
    no results and printed the calculator's message, batched the engine's)."""
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    model = _nan_checkpoint(tmp_path / "nan.pt")
    one, batched = _relaxed_both_ways(tmp_path, capsys, [slab], "--model", str(model))
    assert one[0].info["relax_error"] == "the model's energy or forces are not finite (NaN or inf)"
    assert one[0].info["relax_steps"] == 0 and np.isnan(one[0].get_potential_energy())
    np.testing.assert_allclose(one[0].positions, slab.positions, rtol=0, atol=1e-7)  # extxyz
    _assert_same_outputs(one, batched)


@pytest.mark.parametrize("batched", [False, True])
def test_relax_with_the_fused_kernels_gives_the_pytorch_structures(
    tmp_path: Path, batched: bool, monkeypatch
) -> None:
    """`forcecalc relax --kernels tf32x3` (a force-centric SpinConv, float32): the structures
    of the run without them, to float32 rounding, one by one and batched; the kernels do run
    (on CUDA, else in Triton's interpreter, with large tiles and the per-longitude spectra:
    its cost is per program)."""
    triton_kernels = pytest.importorskip(
        "forcecalc.models.triton_kernels", reason="the fused kernels need triton"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_kernels.kernels_run_on(device):
        pytest.skip("TRITON_INTERPRET is not set")
    if device == "cpu":
        tiles = {"MIXTURE_TILES": (256, 64, 32), "SPECTRA_GRIDS": 16, "SPECTRA_ONE_PRODUCT": False}
        for name, value in tiles.items():
            monkeypatch.setattr(triton_kernels, name, value)
    calls = []
    kernel = triton_kernels.mixture_of_experts
    monkeypatch.setattr(
        triton_kernels, "mixture_of_experts", lambda *a: calls.append(1) or kernel(*a)
    )
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 2.0, "fcc")
    write(tmp_path / "in.extxyz", [slab])
    model = str(OCP_DATA / "spinconv_small_fc.pt")
    common = ["--model", model, "--steps", "3", "--device", device, "--fix-below", "8.0"]
    common += ["--batched", "--batch-size", "1"] if batched else []
    for name, extra in (("plain", []), ("kernels", ["--kernels", "tf32x3"])):
        out = str(tmp_path / f"{name}.extxyz")
        assert main(["relax", str(tmp_path / "in.extxyz"), *common, *extra, "--out", out]) == 0
    plain, fused = read(tmp_path / "plain.extxyz"), read(tmp_path / "kernels.extxyz")
    assert calls
    assert abs(fused.positions - plain.positions).max() < 1e-4
    assert abs(fused.positions - slab.positions).max() > 1e-3  # the atoms did move


def test_kernels_refused_where_they_cannot_serve(tmp_path: Path, capsys, monkeypatch) -> None:
    """`--kernels` names what stands in its way, before any work: an energy-centric model
    (forces by autograd), float64, `--compile` beside it, a model without SpinConv blocks,
    a device the kernels do not run on."""
    pytest.importorskip("triton", reason="the fused kernels need triton")
    import forcecalc.models.triton_kernels as triton_kernels

    write(tmp_path / "in.extxyz", [fcc111("Cu", size=(1, 1, 2), vacuum=5.0)])
    fc = str(OCP_DATA / "spinconv_small_fc.pt")
    relax = ["relax", str(tmp_path / "in.extxyz"), "--device", "cpu", "--kernels", "tf32x3"]
    cases = [
        (["--model", str(SPINCONV_EC)], "is energy-centric"),
        (["--model", fc, "--dtype", "float64"], "computes in float32"),
        (["--model", fc, "--batched", "--compile"], "exclude each other"),
        (["--model", str(OCP_DATA / "forcenet_small.pt")], "holds no SpinConv blocks"),
    ]
    for extra, message in cases:
        assert main([*relax, *extra]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr(triton_kernels, "kernels_run_on", lambda device: False)
    assert main([*relax, "--model", fc]) == 2
    assert "needs a CUDA device (the model is on cpu)" in capsys.readouterr().err
    for task in ("s2ef", "is2rs"):  # eval takes the option too
        args = build_parser().parse_args(
            ["eval", task, "--model", fc, "--data", "x.h5", "--kernels", "mixed"]
        )
        assert args.kernels == "mixed"
