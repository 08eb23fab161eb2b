"""Bad arguments and unreadable inputs of `forcecalc relax`, `md`, `merge` and `eval`: a one-line
error on stderr that names the problem, exit code 2, no traceback, before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.build import fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from forcecalc.cli import main
from forcecalc.data.store import FrameBatch, write_dataset

FORCENET = Path(__file__).parent / "data" / "ocp" / "forcenet_small.pt"

# a model name that does not exist: an argument error must come before loading the model
NO_MODEL = ["--model", "no-such-model"]

CASES = [
    (["md", "one.extxyz", "--index", "7"], "--index 7 is out of range: one.extxyz holds 1"),
    (["md", "one.extxyz", "--timestep", "-1"], "--timestep must be > 0"),
    (["md", "one.extxyz", "--temperature", "-5"], "--temperature must be >= 0"),
    (["md", "one.extxyz", "--steps", "-1"], "--steps must be >= 0"),
    (["md", "one.extxyz", "--log-interval", "0"], "--log-interval must be >= 1"),
    (["md", "one.extxyz", "--timestep", "nan"], "--timestep must be > 0"),
    (["md", "one.extxyz", "--temperature", "nan"], "--temperature must be >= 0"),
    (["md", "one.extxyz", "--seed", "-1"], "--seed must be >= 0"),
    # beyond md()'s ranges, as md() refuses them (inf passed `> 0`; 1e300 overflowed in ASE)
    (["md", "one.extxyz", "--timestep", "inf"], "--timestep must be > 0 and <= 100 fs, got inf"),
    (["md", "one.extxyz", "--timestep", "1e300"], "--timestep must be > 0 and <= 100 fs"),
    (["md", "one.extxyz", "--temperature", "inf"], "--temperature must be >= 0 and <= 1e+06 K"),
    (["md", "one.extxyz", "--friction", "inf"], "--friction must be >= 0 and <= 100 1/fs"),
    (["md", "one.extxyz", "--friction", "1e300"], "--friction must be >= 0 and <= 100 1/fs"),
    (["relax", "one.extxyz", "--fmax", "nan"], "--fmax must be >= 0"),
    (["relax", "one.extxyz", "--out", "OUTCAR"], "no format for the name 'OUTCAR' (vasp-out)"),
    (["md", "one.extxyz", "--steps", "20", "--out", "md.vasp"], "the vasp format holds one"),
    (["md", "bad.xyz"], "cannot read structures from bad.xyz: XYZError"),
    (["relax", "bad.traj"], "cannot read structures from bad.traj"),
    (["relax", "missing.xyz"], "input file missing.xyz does not exist"),
    (["relax", "one.extxyz", "--steps", "-5"], "--steps must be >= 0, got -5"),
    (["relax", "one.extxyz", "--fmax", "-1"], "--fmax must be >= 0"),
    (["eval", "is2rs", "--data", "one.h5", "--steps", "-1"], "--steps must be >= 0"),
    (["eval", "s2ef", "--data", "one.h5", "--max-frames", "0"], "--max-frames must be >= 1"),
    (["relax", "one.extxyz", "--batched", "--batch-size", "x"], "--batch-size must be 'auto'"),
    (["relax", "one.extxyz", "--batch-size", "4"], "--batch-size applies to --batched"),
    (["relax", "data.h5"], "data.h5 is a forcecalc data set (HDF5), which ASE does not read"),
    (["relax", "one.extxyz", "--out", "."], "cannot write .: it is a folder"),
    (["relax", "one.extxyz", "--out", "one.extxyz/r.xyz"], "one.extxyz is a file, not a"),
    (["relax", "one.extxyz", "--shard", "1/2", "--out", "r.db"], "which the db format does"),
    (["eval", "s2ef", "--data", "one.h5", "--out", "one.extxyz/e.json"], "is a file, not a"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_a_one_line_error(
    tmp_path: Path, monkeypatch, capsys, argv: list[str], expected: str
) -> None:
    """Each bad argument or unreadable input file ends with exit code 2 and one stderr line,
    `forcecalc: error: ...`, that names the problem (checked before loading the model)."""
    monkeypatch.chdir(tmp_path)
    write("one.extxyz", fcc111("Cu", size=(2, 2, 2), vacuum=5.0))
    Path("bad.xyz").write_text("hello world\nthis is not a structure\n")
    Path("bad.traj").write_bytes(b"garbage")
    Path("data.h5").write_bytes(b"")
    assert main([*argv, *NO_MODEL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("forcecalc: error: ")
    assert expected in err


def test_merge_checks_the_output_format(tmp_path: Path, capsys) -> None:
    """`merge OUT.vasp` of several structures is a one-line error naming the format."""
    slabs = [fcc111("Cu", size=(2, 2, layers), vacuum=5.0) for layers in (2, 3)]
    for index, slab in enumerate(slabs):
        slab.info["input_index"] = index
    write(tmp_path / "shard.extxyz", slabs)
    assert main(["merge", str(tmp_path / "out.vasp"), str(tmp_path / "shard.extxyz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the vasp format holds one structure, but 2" in err


@pytest.mark.parametrize("argv", [["info", "bad.pt"], ["relax", "one.extxyz", "--model", "bad.pt"]])
def test_a_corrupt_checkpoint_is_a_one_line_error(
    tmp_path: Path, monkeypatch, capsys, argv: list[str]
) -> None:
    """A checkpoint file that is not one (checkpoint.py's CheckpointError) is a one-line
    error naming the file, exit code 2, for `info` and for a command that loads the model."""
    monkeypatch.chdir(tmp_path)
    Path("bad.pt").write_bytes(b"garbage")
    write("one.extxyz", fcc111("Cu", size=(2, 2, 2), vacuum=5.0))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("forcecalc: error: ") and "bad.pt" in err


def test_one_by_one_relax_checks_every_structure_first(tmp_path: Path, monkeypatch, capsys):
    """`relax` (ASE's optimizers, one structure at a time) checks every structure before the
    first step and names the bad one by its place in the input, as `--batched` does."""
    monkeypatch.chdir(tmp_path)
    good = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    bad = good.copy()
    bad.positions[1] = bad.positions[0]
    write("in.extxyz", [good, good, bad])
    steps = []
    monkeypatch.setattr("ase.optimize.BFGS.step", lambda self, *a, **k: steps.append(1))
    assert main(["relax", "in.extxyz", "--model", str(FORCENET), "--optimizer", "BFGS"]) == 2
    err = capsys.readouterr().err
    assert "structure 2 (Cu8): atoms 0 and 1 are 0 Å apart" in err and not steps


def test_unreadable_data_and_configs_are_one_line_errors(tmp_path: Path, monkeypatch, capsys):
    """A --data file that is not a frames file, a --config that is not valid YAML and a
    --resume that is a model checkpoint (not a training state) are one-line errors naming
    the file."""
    monkeypatch.chdir(tmp_path)
    Path("junk.h5").write_text("not hdf5")
    Path("bad.yaml").write_text("lr: [1, 2\n")
    Path("cut.pt").write_bytes(FORCENET.read_bytes()[:1000])  # a truncated training state
    cases = [
        (["eval", "s2ef", "--model", str(FORCENET), "--data", "junk.h5"], "junk.h5 is not a"),
        (["train", "--config", "bad.yaml"], "bad.yaml: not valid YAML"),
        (["train", "--resume", str(FORCENET)], "is not a training state"),
        (["train", "--resume", "cut.pt"], "cut.pt is not a PyTorch checkpoint (or is truncated"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def test_eval_checks_its_data_first(tmp_path: Path, monkeypatch, capsys):
    """`eval` refuses, in one line and before evaluating anything: frames without stored
    labels, a file without frames, a file without systems for is2rs, --max-systems below 1,
    and two --data files with one name (the report's keys); `data oc20emt --out` a file (not
    a folder) too."""
    monkeypatch.chdir(tmp_path)
    write("nolabel.extxyz", fcc111("Cu", size=(2, 2, 2), vacuum=5.0))
    assert main(["data", "convert", "nolabel.extxyz", "nolabel.h5"]) == 0
    Path("b").mkdir()
    assert main(["data", "convert", "nolabel.extxyz", "b/nolabel.h5"]) == 0
    Path("empty.extxyz").write_text("")
    assert main(["data", "convert", "empty.extxyz", "empty.h5"]) == 0
    assert "holds no frames" in capsys.readouterr().err
    model = ["--model", str(FORCENET), "--device", "cpu"]
    cases = [
        (["eval", "s2ef", *model, "--data", "nolabel.h5"], "have no stored energy and forces"),
        (["eval", "s2ef", *model, "--data", "empty.h5"], "empty.h5 has no frames"),
        (["eval", "is2rs", *model, "--data", "nolabel.h5"], "has no systems"),
        (["eval", "is2rs", *model, "--data", "nolabel.h5", "--max-systems", "0"], ">= 1"),
        (["eval", "s2ef", *model, "--data", "nolabel.h5", "b/nolabel.h5"], "distinct names"),
        (["data", "oc20emt", "--size", "tiny", "--out", "nolabel.h5"], "nolabel.h5 is a file"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def _split(
    path: str,
    labelled: bool = True,
    columns: tuple[str, ...] = ("initial_frame", "relaxed_frame", "relaxed_energy"),
    seed: int | None = None,
) -> None:
    """A one-system split file: a Cu slab's initial and relaxed frame, labelled (energy 0,
    zero forces) or not, a systems table of ``columns`` (none: no systems), and, with a
    ``seed``, the generator's data-set attributes of that seed."""
    frames = [fcc111("Cu", size=(2, 2, 2), vacuum=5.0) for _ in range(2)]
    for atoms in frames:
        atoms.info.clear()
        if labelled:
            atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((8, 3)))
    table = {"initial_frame": [0], "relaxed_frame": [1], "relaxed_energy": [0.0]}
    attrs = None if seed is None else {"generator": "forcecalc.data.oc20emt", "seed": seed}
    batch = FrameBatch.from_atoms(frames, system=[0, 0] if columns else None)
    write_dataset(path, batch, {c: table[c] for c in columns} or None, attrs)


def test_eval_checks_every_input_before_loading_the_model(tmp_path: Path, monkeypatch, capsys):
    """`eval` checks what it reads before it loads the model, and refuses in one line naming
    the option and the file: for is2rs, --data systems without initial_frame, relaxed_frame
    and relaxed_energy, and a --train without relaxed energies (the IS2RE baseline); for
    s2ef, --data and --train frames without stored labels and a --train without frames; for
    both, a --train and a --data of two generated data sets (another seed). Files without the
    generator's attributes (converted user data) are not compared."""
    monkeypatch.chdir(tmp_path)
    _split("split.h5", seed=0)
    _split("train.h5", seed=0)
    _split("seed1.h5", seed=1)
    _split("user.h5")
    _split("nolabel.h5", labelled=False, columns=())
    _split("nocolumns.h5", columns=("relaxed_energy",))
    write_dataset("empty.h5", FrameBatch.from_atoms([]))

    def no_loading(*args, **kwargs):
        raise ValueError("the model was loaded")

    monkeypatch.setattr("forcecalc.checkpoint.load_checkpoint", no_loading)
    s2ef, is2rs = ["eval", "s2ef", "--model", "m.pt"], ["eval", "is2rs", "--model", "m.pt"]
    cases = [
        (
            [*is2rs, "--data", "split.h5", "--train", "nolabel.h5"],
            "--train nolabel.h5 has no systems with a relaxed_energy to fit the IS2RE median",
        ),
        (
            [*is2rs, "--data", "nocolumns.h5"],
            "--data nocolumns.h5: its systems table lacks initial_frame, relaxed_frame:",
        ),
        (
            [*s2ef, "--data", "split.h5", "--train", "empty.h5"],
            "--train empty.h5 has no frames to fit the median baseline on",
        ),
        (
            [*s2ef, "--data", "split.h5", "--train", "nolabel.h5"],
            "--train nolabel.h5: frames [0, 1] (2 of 2) have no stored energy and forces to fit",
        ),
        (
            [*s2ef, "--data", "user.h5", "nolabel.h5"],
            "--data nolabel.h5: frames [0, 1] (2 of 2) have no stored energy and forces",
        ),
        (
            [*s2ef, "--data", "split.h5", "--train", "seed1.h5"],
            "--train seed1.h5 and --data split.h5 come from different generated data sets "
            "(seed 1 != 0)",
        ),
        (
            [*is2rs, "--data", "user.h5", "split.h5", "--train", "seed1.h5"],
            "--train seed1.h5 and --data split.h5 come from different generated data sets",
        ),
        ([*s2ef, "--data", "split.h5", "user.h5", "--train", "train.h5"], "the model was loaded"),
        ([*is2rs, "--data", "user.h5", "--train", "seed1.h5"], "the model was loaded"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, (argv, err)


@pytest.mark.parametrize(
    ("argv", "where"),
    [
        (["eval", "s2ef", "--model", "m", "--data", "d.h5", "--max-systems", "3"], "eval s2ef"),
        (["relax", "in.xyz", "--model", "m", "--bogus"], "relax"),
        (["data", "oc20emt", "--size", "tiny", "--out", "x", "--bogus"], "data oc20emt"),
    ],
)
def test_an_unknown_option_is_named_with_its_commands_help(argv, where, capsys) -> None:
    """An option the command does not know is a one-line usage error (exit code 2) naming the
    command, e.g. `forcecalc eval s2ef`, and pointing to that command's own --help."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"forcecalc {where}: error: unrecognized arguments: ")
    assert err.endswith(f"(see forcecalc {where} --help)") and "\n" not in err


@pytest.mark.parametrize(
    ("argv", "where", "tasks"),
    [
        (["eval", "--model", "m", "s2ef", "--data", "d.h5"], "eval", "s2ef|is2rs"),
        (["data", "--size", "tiny", "oc20emt"], "data", "oc20emt|is2rs|convert"),
    ],
)
def test_an_option_before_the_task_says_where_it_goes(argv, where, tasks, capsys) -> None:
    """`forcecalc eval --model X s2ef` (an option between a command and its task) is a one-line
    usage error, exit code 2, that says the task comes first and names the tasks (argparse
    alone called the option's value an invalid task); `--help` there still helps."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"forcecalc {where}: error: {argv[1]} comes before the task: name the task first, then "
        f"its options (forcecalc {where} {tasks} {argv[1]} ...; see forcecalc {where} --help)\n"
    )
    with pytest.raises(SystemExit) as stop:
        main([where, "--help"])
    assert stop.value.code == 0


def test_a_positional_taken_by_a_list_option_says_how_to_write_it(capsys) -> None:
    """`forcecalc finetune --data f.extxyz CHECKPOINT`: --data takes CHECKPOINT as a second
    file, and argparse calls CHECKPOINT missing; the one-line error says why and how to write
    it (exit code 2). A missing positional without such an option on the line (none given, or
    one that takes a single value) gets no such hint."""
    swallowed = ["finetune", "--data", "f.extxyz", "spinconv-fc", "--out", "x"]
    for argv in (swallowed, ["finetune"], ["finetune", "--out", "x"], ["relax"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
    finetune, *others = capsys.readouterr().err.splitlines()
    assert "required: checkpoint; --data takes every word after it: give checkpoint" in finetune
    assert finetune.endswith("or end its values with -- (see forcecalc finetune --help)")
    assert len(others) == 3 and not [line for line in others if "every word" in line]


def test_forcecalc_warnings_are_one_line_like_its_errors(tmp_path: Path, monkeypatch, capsys):
    """A warning of forcecalc's own reaches the command line as one ``forcecalc: warning:``
    line (here: a known checkpoint name that is also a folder in the working directory, which
    is not used), not in Python's two-line ``file:line: UserWarning`` format; the command
    goes on."""
    (tmp_path / "spinconv-fc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["info", "spinconv-fc"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("forcecalc: warning: 'spinconv-fc' is a known checkpoint name")
    assert err.count("\n") == 1 and "UserWarning" not in err


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, capsys) -> None:
    """Ctrl-C during a command ends it with ``forcecalc: interrupted`` and exit code 130 (a
    shell's code for SIGINT), not a traceback."""
    import forcecalc.cli

    def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(forcecalc.cli, "_cmd_info", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "forcecalc: interrupted\n"
