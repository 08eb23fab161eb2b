"""The training loop: losses, optimisation, evaluation, checkpoints, exact resume, DDP.

Files written to ``config.out`` (each by temp file + rename, by process 0 only):

* ``checkpoint.pt``: the resumable state (every ``checkpoint_every`` steps, after every
  evaluation and at the end): model, optimizer, schedule, moving average, random states of
  every process, the data position (epoch and batch within it), the training-loss sums of
  every process since the last evaluation (summed), metrics history, config;
* ``best.pt``: the model with the best validation score so far, in forcecalc's checkpoint
  format (:func:`forcecalc.checkpoint.save_checkpoint`);
* ``final.pt``: the model at the end, same format, with metadata (data, config, metrics,
  hardware, time);
* in both, a SpinConv's distance scaling of element pairs absent from the training data is
  filled from the reverse pair or the two self pairs
  (:func:`forcecalc.models.spinconv.fill_untrained_pairs`;
  the pairs filled are in the metadata);
* ``metrics.csv``, ``metrics.json``: one row per evaluation (when the last step is not an
  evaluation step, one more row there, marked ``final``); ``config.yaml``: the config,
  written once the first step has succeeded.

A run that fails before its first step (a bad frame in the first batch) leaves no output
folder that it made, and a folder that was there as it was.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import io
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from forcecalc.atomic import torch_save, write_text
from forcecalc.checkpoint import (
    TRAINING_STATE_FORMAT,
    CheckpointInfo,
    Normalizers,
    Potential,
    element_symbols,
    load_checkpoint,
    read_torch_file,
    resolve_dtype,
    save_checkpoint,
)
from forcecalc.graph.batch import MAX_ATOMIC_NUMBER
from forcecalc.models.registry import build_model
from forcecalc.models.spinconv import fill_untrained_pairs, trainable_distance_blocks
from forcecalc.train.config import TrainConfig
from forcecalc.train.data import (
    BatchPlan,
    Collater,
    IndexedFrames,
    TrainBatch,
    atom_weights,
    checked_frame,
    elements_of,
    frame_targets,
    labelled_elements,
    labelled_numbers,
    open_frames,
    random_split,
    seeded_subset,
)
from forcecalc.train.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    convert_batchnorm,
    init_from_env,
)
from forcecalc.train.evaluate import predict_frames, s2ef_metrics
from forcecalc.train.losses import compute_loss, random_rotations, rotate, rotation_axes
from forcecalc.train.optim import (
    EMA,
    LRSchedule,
    all_norm_layers,
    build_optimizer,
    freeze_except,
    frozen_norm_layers,
)
from forcecalc.warning import warn

if TYPE_CHECKING:
    from tqdm.auto import tqdm

STATE_VERSION = 1
#: Options whose change makes a resumed run another run (the data position means nothing).
RUN_DEFINING = ("data", "val_data", "val_fraction", "split_seed", "batch_size", "seed")
#: Metadata a fine-tuned checkpoint keeps from the one it started from (its energy definition
#: only with the normalizers kept: refitted, they define the training data's energies).
INHERITED_METADATA = ("license", "energy")
STATE_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
FINAL_FILE = "final.pt"
_WRITTEN = (STATE_FILE, BEST_FILE, FINAL_FILE, "metrics.csv", "metrics.json", "config.yaml")


class TrainingDiverged(ValueError):
    """The training loss stopped being finite: the run stops before it writes a state, a
    model or metrics of the diverged weights (a ``ValueError``: what made it diverge is the
    configuration, e.g. a learning rate too large)."""


def read_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """The training state at ``path`` (``checkpoint.pt`` in a run's folder), or a
    ``ValueError`` saying it is none (e.g. a model checkpoint, ``best.pt``)."""
    # a missing or corrupt file is an error naming it
    state = read_torch_file(
        Path(path), unsafe_hint="forcecalc's training states never need it: not one of them"
    )
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(
            f"{path} is not a training state (a model checkpoint?): resuming takes the "
            "checkpoint.pt that training writes into its out folder"
        )
    return state


def energy_targets(batch: TrainBatch, normalizers: Normalizers) -> torch.Tensor:
    """``[n_systems]`` float64 normalized energy targets of a collated (host) batch,
    ``(E - element references - mean) / std``, computed in float64 before any cast to the
    model's dtype: total energies of hundreds of eV and their references cancel to a few eV,
    which float32 would carry to ~1e-5 eV only."""
    graph = batch.graph
    reference = normalizers.reference_energy(graph.numbers, graph.system_idx, graph.n_systems)
    return (batch.energy - reference - normalizers.energy_mean) / normalizers.energy_std


def fit_normalizers(
    frames: Sequence, max_frames: int, seed: int, references: bool = False
) -> Normalizers:
    """Energy mean and standard deviation, and the force RMS (a standard deviation about 0),
    over at most ``max_frames`` randomly chosen frames.  With ``references``, first a
    reference energy per element, the least-squares fit of the energies on the frames'
    element counts (for total energies), and then the mean and standard deviation of what
    they leave."""
    n = len(frames)
    if n == 0:
        raise ValueError("no training frames to fit the normalizers on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    energies, counts, squares, count = [], [], 0.0, 0
    for index in np.sort(order[: min(max_frames, n)]):
        atoms = checked_frame(frames, int(index))  # a bad frame: named by file and index
        energy, forces = frame_targets(atoms)
        energies.append(energy)
        counts.append(np.bincount(atoms.numbers, minlength=MAX_ATOMIC_NUMBER + 1))
        squares += float((forces * forces).sum())
        count += forces.size
    element_references: tuple[tuple[int, float], ...] = ()
    residual = np.asarray(energies)
    if references:
        matrix = np.stack(counts).astype(np.float64)
        present = np.flatnonzero(matrix.any(axis=0))
        if np.linalg.matrix_rank(matrix[:, present]) < len(present):
            raise ValueError(
                "the element counts of the frames the normalizers are fitted on do not "
                f"determine a reference energy for each of the elements {present.tolist()} "
                "(e.g. every frame holds two of them in one ratio): add frames of other "
                "compositions, or train without energy_references"
            )
        solution, *_ = np.linalg.lstsq(matrix[:, present], residual, rcond=None)
        element_references = tuple(
            (int(z), float(e)) for z, e in zip(present, solution, strict=True)
        )
        residual = residual - matrix[:, present] @ solution
    energy_std = float(np.std(residual)) if len(residual) > 1 else 0.0
    forces_std = math.sqrt(squares / max(count, 1))
    return Normalizers(
        energy_mean=float(np.mean(residual)),
        energy_std=energy_std if energy_std > 1e-8 else 1.0,
        forces_std=forces_std if forces_std > 1e-8 else 1.0,
        element_references=element_references,
    )


def _number_ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``."""
    parts: list[str] = []
    start = previous = None
    for value in [*values, None]:
        if previous is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = value
    return ", ".join(parts)


def _zero_weights_cause(config: TrainConfig) -> str:
    """Why every atom of a batch can have force-loss weight 0 under ``config``."""
    if config.tag_weights is not None:
        return (
            f"tag_weights {config.tag_weights} give its atoms' tags weight 0 (atoms read from "
            "ASE files have tag 0 unless their tags were set; OC20's are 0 subsurface, "
            "1 surface, 2 adsorbate)"
        )
    return f"its atoms are all fixed and fixed_atom_weight is {config.fixed_atom_weight}"


def _check_not_empty(frames: Sequence, role: str) -> None:
    """A ``ValueError`` naming the source when ``frames`` (a :class:`ConcatFrames` of files,
    or a list) or one of its files holds no frame; ``role``: training or validation."""
    names = getattr(frames, "names", ["<frames>"])
    sources = getattr(frames, "sources", [frames])
    for name, source in zip(names, sources, strict=True):
        if len(source) == 0:
            raise ValueError(f"{role} data {name} has no frames")
    if len(frames) == 0:
        raise ValueError(f"no {role} frames")


def _check_output_folder(folder: Path) -> None:
    """A ValueError, before any work, if ``folder`` cannot be made or written into (a file
    there or above it, a broken symbolic link above it, no permission, or whatever the OS
    says when it is made, e.g. a name too long).  Folders it makes to find out are removed
    again, so a run that fails its set-up leaves no empty folder behind."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot write the run into {folder}: it is a file")
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():
            raise ValueError(
                f"cannot write the run into {folder}: {ancestor} is a broken symbolic link"
            )
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot write the run into {folder}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK):
        raise ValueError(f"cannot write the run into {folder}: no permission to write there")
    _remove_made_folders(_make_output_folder(folder), folder)


def _make_output_folder(folder: Path) -> Path | None:
    """Make ``folder`` and the missing folders above it.

    Returns:
        The topmost folder made (``None``: ``folder`` existed), for
        :func:`_remove_made_folders`.

    Raises:
        ValueError: a folder cannot be made, naming ``folder`` and the OS's reason (what was
            made before the failure is removed again).
    """
    top = None
    missing = folder
    while not missing.exists() and missing != missing.parent:
        top, missing = missing, missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remove_made_folders(top, folder)
        raise ValueError(
            f"cannot write the run into {folder}: {error.strerror or error}"
        ) from error
    return top


def _remove_made_folders(top: Path | None, folder: Path) -> None:
    """Remove ``folder`` and the folders above it up to ``top`` (those
    :func:`_make_output_folder` made), each only if it is empty."""
    if top is None:
        return
    for path in (folder, *folder.parents):
        with contextlib.suppress(OSError):  # absent, or not empty: another's files stay
            path.rmdir()
        if path == top:
            return


def _run_files(folder: Path) -> list[Path]:
    """The files a training run writes (:data:`_WRITTEN`) that ``folder`` holds."""
    return [folder / name for name in _WRITTEN if (folder / name).is_file()]


def _remove_stale_temp_files(folder: Path) -> None:
    """Delete temp files a killed run left behind (its completed files are untouched)."""
    for name in _WRITTEN:
        for stale in folder.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)


class Trainer:
    """Trains (or fine-tunes) one model as ``config`` says.

    Args:
        config: the options.
        train_frames: labelled ``ase.Atoms`` to train on (default: ``config.data``).
        val_frames: validation frames (default: ``config.val_data``, else a random
            ``config.val_fraction`` of the training frames).
        resume: a state file written by a previous run (``out/checkpoint.pt``): the run
            continues exactly where it stopped (same config and data expected).
        overwrite: start a new run in an ``out`` folder that holds another run's files, which
            are removed once the new run's first step has succeeded (without it, such a folder
            is an error: the two runs' files would mix).

    Launched by ``torchrun`` (``WORLD_SIZE > 1``) every process runs a Trainer on its share of
    each batch; gradients are averaged and batch-norm statistics computed over all processes,
    so the result equals one process with the combined batch.
    """

    def __init__(
        self,
        config: TrainConfig,
        train_frames: Sequence | None = None,
        val_frames: Sequence | None = None,
        resume: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.dist, self.device = init_from_env(config.device)
        self.dtype = resolve_dtype(config.dtype)
        if config.amp and self.device.type != "cuda":
            warn("amp (bf16 autocast) applies on CUDA only; training in full precision")
        self.out = Path(config.out)
        #: another run's files in ``out``, removed when this run writes its first
        self._replaced = [] if resume is not None else _run_files(self.out)
        if self.dist.is_main:
            _check_output_folder(self.out)  # made once the set-up has passed its checks
            if self._replaced and not overwrite:
                raise ValueError(
                    f"{self.out} holds another training run "
                    f"({', '.join(p.name for p in self._replaced)}): continue it with "
                    "--resume, replace it with --overwrite, or choose another --out"
                )
        state = None if resume is None else read_training_state(resume)
        self.train_frames, self.val_frames, self.data_info, numbers = self._open_data(
            train_frames, val_frames
        )

        torch.manual_seed(config.seed)
        self.potential = self._build_potential(state)
        if config.init_checkpoint and config.model != self.potential.name:
            # the architecture is the checkpoint's: record that, not a default
            self.config = config = replace(config, model=self.potential.name)
        self._check_elements(numbers)
        model = self.potential.model
        freeze_except(model, config.freeze_except)
        if self.dist.active and config.sync_batchnorm:
            convert_batchnorm(model)
        keep = config.norm_statistics == "keep" or (
            config.norm_statistics == "auto" and bool(config.init_checkpoint)
        )
        # a fine-tuned model's statistics are those its weights were trained with: a few small
        # fine-tuning batches overwrote ForceNet's (force MAE 0.07 -> 0.70 eV/Å in 30 steps)
        self.frozen_norms = all_norm_layers(model) if keep else frozen_norm_layers(model)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("every parameter is frozen: nothing to train")
        #: SpinConv's element pairs whose distance scaling had a gradient in this run, per
        #: distance block: trained, whatever their values (see fill_untrained_pairs)
        self.distance_blocks = trainable_distance_blocks(model)
        self.trained_pairs = {
            name: torch.zeros(block.max_num_elements**2, dtype=torch.bool, device=self.device)
            for name, block in self.distance_blocks.items()
        }
        #: whether the first step's force-loss weights were looked at (train_step)
        self._weights_checked = False
        self.module: torch.nn.Module = model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            self.module = DistributedDataParallel(
                model,
                find_unused_parameters=config.energy_coefficient == 0
                or config.force_coefficient == 0,
            )
        self.optimizer = build_optimizer(
            self.parameters, config.optimizer, config.lr, config.amsgrad, config.weight_decay
        )
        self.plan = BatchPlan(
            len(self.train_frames),
            config.batch_size,
            seed=config.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.steps_per_epoch = len(self.plan.global_batches(0))
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_frames)} training frames cannot feed "
                f"{self.dist.world_size} processes"
            )
        self.total_steps = (
            config.max_steps
            if config.max_steps is not None
            else config.max_epochs * self.steps_per_epoch
        )
        self.schedule = LRSchedule(
            self.optimizer,
            config.scheduler,
            config.lr,
            self.total_steps,
            warmup_steps=config.warmup_steps,
            warmup_factor=config.warmup_factor,
            min_lr=config.min_lr,
            factor=config.plateau_factor,
            patience=config.plateau_patience,
        )
        self.ema = EMA(self.parameters, config.ema_decay) if config.ema_decay else None
        self.loader = DataLoader(
            IndexedFrames(self.train_frames, oc20_tags=config.tag_weights is not None),
            batch_sampler=self.plan,
            collate_fn=Collater(self.potential.cutoff),
            num_workers=config.num_workers,
            # its own generator: making an iterator (each epoch, and on a resume mid-epoch)
            # must not draw from the global generator the random rotations use
            generator=torch.Generator().manual_seed(config.seed + self.dist.rank),
        )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best = math.inf
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self._sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        self._sum_steps = 0
        #: the topmost folder this run made for its outputs (``None``: it was there)
        self._made_folder: Path | None = None
        torch.manual_seed(config.seed + self.dist.rank)
        if state is not None:
            self._load_state(state)
        if self.dist.is_main:
            self._made_folder = _make_output_folder(self.out)
            _remove_stale_temp_files(self.out)

    # ---------------------------------------------------------------------------------------
    # set-up

    def _open_data(
        self, train_frames: Sequence | None, val_frames: Sequence | None
    ) -> tuple[Sequence, Sequence, dict[str, Any], dict[str, set[int]]]:
        """``(train, val, data info, atomic numbers per training source)``; every frame of
        every source is checked for the energy and forces training needs."""
        config = self.config
        #: the atomic numbers of the validation frames, per source
        self.val_numbers: dict[str, set[int]] = {}
        train = open_frames(config.data) if train_frames is None else train_frames
        names = list(config.data) if train_frames is None else ["<frames>"]
        elements = labelled_elements(train)
        numbers = elements_of(elements)
        _check_not_empty(train, "training")
        if val_frames is not None or config.val_data:
            shared = {str(Path(v).resolve()) for v in config.val_data} & {
                str(Path(d).resolve()) for d in config.data
            }
            if val_frames is None and train_frames is None and shared:
                warn(
                    f"the validation data {', '.join(sorted(shared))} is training data too: "
                    "its errors measure the fit, not how the model does on unseen frames"
                )
            val = open_frames(config.val_data) if val_frames is None else val_frames
            self.val_numbers = labelled_numbers(val)
            if val_frames is None:
                _check_not_empty(val, "validation")
            split = {"kind": "files", "val": list(config.val_data) or ["<frames>"]}
        elif config.val_fraction > 0:
            train, val = random_split(train, config.val_fraction, config.split_seed)
            # the held-out frames' elements are validation elements (one only there is
            # untrained), as those of separate validation data
            numbers = elements_of(elements, train.indices)
            self.val_numbers = elements_of(elements, val.indices)
            split = {"kind": "random", "fraction": config.val_fraction, "seed": config.split_seed}
        else:
            val, split = [], {"kind": "none"}
        if config.val_max_frames is not None and len(val) > config.val_max_frames:
            val = seeded_subset(val, config.val_max_frames, config.split_seed)
            split["max_frames"] = config.val_max_frames
        info = {
            "train": names,
            "train_frames": len(train),
            "val_frames": len(val),
            "split": split,
        }
        return train, val, info, numbers

    def _check_elements(self, numbers: dict[str, set[int]]) -> None:
        """Refuse training or validation data with elements the model's tables cannot
        represent (naming the elements and the sources holding them) or without a reference
        energy, before any step (validation data were found one epoch in); when the
        checkpoint lists the elements it accepts (a run from scratch: none yet), extend the
        list by the training data's, so that the checkpoints written accept what the model
        was trained on (and a model trained on Cu and O refuses Pt), and warn of validation
        elements outside it."""
        info = self.potential.info
        seen = set().union(*numbers.values())
        representable = self.potential.table_elements
        for which, sources in (("training", numbers), ("validation", self.val_numbers)):
            elements = set().union(*sources.values())
            if representable is not None and not elements <= set(representable):
                bad = elements - set(representable)
                holding = [name for name, found in sources.items() if found & bad]
                symbols = ", ".join(element_symbols(bad))
                raise ValueError(
                    f"the {which} data ({', '.join(holding)}) has element(s) {symbols} that the "
                    f"{info.model} model cannot represent (its tables cover atomic numbers "
                    f"{_number_ranges(sorted(representable))})"
                )
            missing = info.normalizers.missing_references(elements)
            if missing:  # (validation: its energy errors would be NaN, its best never kept)
                untrained = set(missing) - seen
                hint = (
                    f"the training data holds no {', '.join(element_symbols(untrained))}: "
                    "train on frames with them, or validate without them"
                    if untrained
                    else "raise normalizer_frames, or refit them"
                )
                raise ValueError(
                    f"the {which} data has element(s) {missing} without a reference energy (the "
                    "references come from the frames the normalizers were fitted on, or from "
                    f"the checkpoint): {hint}"
                )
        if info.elements is not None:
            info.elements = sorted(set(info.elements) | seen)
            untrained = set().union(*self.val_numbers.values()) - set(info.elements)
            if untrained:
                symbols = ", ".join(element_symbols(untrained))
                warn(
                    f"the validation data has element(s) {symbols} that neither the training "
                    "data nor the checkpoint hold: their errors measure untrained parameters"
                )

    def _build_potential(self, state: dict[str, Any] | None) -> Potential:
        config = self.config
        if state is not None:
            saved = state["potential"]
            info = CheckpointInfo(
                model=saved["model"],
                model_kwargs=dict(saved["model_kwargs"]),
                normalizers=Normalizers.from_dict(saved["normalizers"]),
                source_format=saved["source_format"],
                elements=saved["elements"],
                metadata=dict(saved["metadata"]),
            )
            # in the run's dtype before the weights arrive (float64 weights loaded into a
            # float32 model were rounded)
            model = build_model(info.model, info.model_kwargs).to(self.dtype)
            model.load_state_dict(state["model"])
            potential = Potential(model, info)
        elif config.init_checkpoint:
            # model_kwargs override the checkpoint's own (e.g. envelope, forces), as
            # load_checkpoint's model options; the weights must still fit
            potential = load_checkpoint(
                config.init_checkpoint,
                device=self.device,
                dtype=self.dtype,
                allow_unsafe=config.allow_unsafe,
                **config.model_kwargs,
            )
            started = potential.info.metadata
            potential.info.metadata = {
                # what the fine-tuned model still is: its license and energy definition
                **{k: started[k] for k in INHERITED_METADATA if k in started},
                "init_checkpoint": {
                    "path": potential.info.path,
                    "format": potential.info.source_format,
                    "normalizers": potential.info.normalizers.as_dict(),
                    "elements": potential.info.elements,
                    "name": started.get("name"),
                },
            }
        else:
            model = build_model(config.model, config.model_kwargs)
            info = CheckpointInfo(
                model=config.model,
                model_kwargs=dict(config.model_kwargs),
                normalizers=Normalizers(),
                source_format="forcecalc",
                elements=[],  # the training data's, once read (_check_elements)
            )
            potential = Potential(model, info)
        potential = potential.to(device=self.device, dtype=self.dtype)
        if state is None and config.normalizers == "keep" and not config.init_checkpoint:
            raise ValueError(
                "normalizers='keep' keeps a checkpoint's normalizers, but no init_checkpoint "
                "is given: use 'fit' (or 'auto') to fit them on the training frames"
            )
        fit = config.normalizers == "fit" or (
            config.normalizers == "auto" and not config.init_checkpoint
        )
        if config.energy_references == "fit" and not fit:
            raise ValueError(
                "energy_references='fit' fits them with the normalizers: use "
                "normalizers='fit' (or 'auto' when training from scratch)"
            )
        if state is None and fit:
            normalizers = fit_normalizers(
                self.train_frames,
                config.normalizer_frames,
                config.seed,
                references=config.energy_references == "fit",
            )
            if potential.energy_gradient:
                # Forces are the gradient of the normalized energy: they must be scaled by the
                # energy's std, or they would not be -dE/dx of the energy the model reports.
                normalizers = replace(normalizers, forces_std=normalizers.energy_std)
            potential.info.normalizers = normalizers
            metadata = potential.info.metadata
            if "energy" in metadata:  # the start's definition no longer holds
                metadata["energy"] = (
                    "the training data's energy labels (the normalizers were refitted on "
                    f"them; the checkpoint fine-tuned from predicted: {metadata['energy']})"
                )
        return potential

    def _train_mode(self) -> None:
        self.potential.train()
        for module in self.frozen_norms:
            module.eval()

    # ---------------------------------------------------------------------------------------
    # one step

    def train_step(self, batch: TrainBatch) -> None:
        """One optimisation step on a collated batch (this process's share of the global
        batch): augmentation, loss, backward, gradient averaging, clipping, update, average."""
        config = self.config
        rotations = None
        if config.rotation != "none":  # drawn from the batch on the host: no device sync
            keys = [(config.seed, self.epoch, int(i)) for i in batch.index.tolist()]
            rotations = random_rotations(keys, rotation_axes(batch.graph, config.rotation))
        norm = self.potential.info.normalizers
        target_energy = energy_targets(batch, norm).to(self.device, self.dtype)
        batch = batch.to(self.device, self.dtype)
        graph, forces = batch.graph, batch.forces
        if rotations is not None:
            graph, forces = rotate(graph, forces, torch.from_numpy(rotations))
        target_forces = forces / norm.forces_std
        weights = atom_weights(graph, config.fixed_atom_weight, config.tag_weights).to(self.dtype)
        denominators = all_reduce_sum(
            torch.stack([weights.new_tensor(float(graph.n_systems)), weights.sum()]), self.dist
        )
        if not self._weights_checked:  # once per run: one host synchronisation
            self._weights_checked = True
            if self.dist.is_main and config.force_coefficient > 0 and float(denominators[1]) == 0:
                warn(
                    "every atom of the first batch has force-loss weight 0, so such batches "
                    f"train on energies only: {_zero_weights_cause(config)}"
                )
        self._train_mode()
        amp = config.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            out = self.module(graph)
        terms = compute_loss(
            out["energy"].to(self.dtype),
            out["forces"].to(self.dtype),
            target_energy,
            target_forces,
            weights,
            denominators,
            energy_loss=config.energy_loss,
            force_loss=config.force_loss,
            energy_coefficient=config.energy_coefficient,
            force_coefficient=config.force_coefficient,
            world_size=self.dist.world_size,
        )
        self.optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        for name, block in self.distance_blocks.items():
            self.trained_pairs[name] |= block.pairs_with_gradient()
        if config.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, config.clip_grad_norm)
        self.schedule.apply(self.step)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        with torch.no_grad():
            energy_error = (out["energy"].detach() - target_energy).abs().sum() * norm.energy_std
            # over free atoms, as the validation metrics (OC20's); a mask, not an index: no
            # host synchronisation
            free = ~graph.fixed
            error = (out["forces"].detach() - target_forces).abs() * free.unsqueeze(1)
            force_error = error.sum() * norm.forces_std
            self._sums += torch.stack(
                [
                    terms.loss.detach().double() / self.dist.world_size,
                    energy_error.double(),
                    torch.tensor(float(graph.n_systems), dtype=torch.float64, device=self.device),
                    force_error.double(),
                    3.0 * free.sum(dtype=torch.float64),
                ]
            )
        self._sum_steps += 1

    # ---------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> dict[str, Any]:
        """Train until ``max_steps`` (or ``max_epochs``), then write ``final.pt``.

        Returns:
            ``{"step", "epoch", "metrics"`` (final evaluation), ``"best"`` (best monitored
            score), ``"final"`` (path of ``final.pt``), ``"best_path"`` (``best.pt``, ``None``
            if no evaluation ran)``}``.
        """
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            desc="train",
            disable=not (self.config.progress and self.dist.is_main),
            dynamic_ncols=True,
        )
        first_step = self.step
        if first_step >= self.total_steps and self.dist.is_main:
            self._write_config()  # nothing left to train (a finished run resumed)
        try:
            with bar:
                self._train(bar)
        except BaseException:
            if self.step == first_step and self.dist.is_main:
                # nothing written yet: leave no folder behind that this run made
                _remove_made_folders(self._made_folder, self.out)
            raise
        final_metrics = (
            self.history[-1]
            if self.history and self.history[-1]["step"] == self.step
            else self._final_evaluation()
        )
        self.export(self.out / FINAL_FILE, final_metrics)
        barrier(self.dist)
        best = self.out / BEST_FILE
        return {
            "step": self.step,
            "epoch": self.epoch,
            "metrics": final_metrics,
            "best": self.best,
            "final": str(self.out / FINAL_FILE),
            "best_path": str(best) if best.exists() else None,
        }

    def _train(self, bar: tqdm) -> None:
        """The steps up to ``total_steps`` (or ``max_time``), with their evaluations and saved
        states.  ``config.yaml`` is written once the first of them has succeeded: a bad frame
        read in the first batch leaves an output folder as it was."""
        config = self.config
        started = time.perf_counter()
        elapsed_before = self.elapsed
        first_step = self.step
        done = self.step >= self.total_steps
        while not done:
            self.plan.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in self.loader:
                self.train_step(batch)
                if self.step == first_step and self.dist.is_main:
                    for path in self._replaced:  # --overwrite: the other run's files go
                        path.unlink(missing_ok=True)
                    self._write_config()
                self.step += 1
                self.batch_in_epoch += 1
                self.elapsed = elapsed_before + time.perf_counter() - started
                bar.update(1)
                if self.step % 10 == 0 and not bar.disable:
                    bar.set_postfix(
                        loss=f"{float(self._sums[0]) / max(self._sum_steps, 1):.4g}",
                        lr=f"{self.optimizer.param_groups[0]['lr']:.3g}",
                    )
                if self.batch_in_epoch == self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                done = self.step >= self.total_steps or self._out_of_time()
                if config.eval_every:
                    evaluate = self.step % config.eval_every == 0
                else:
                    evaluate = self.batch_in_epoch == 0
                save = evaluate or (not done and self.step % config.checkpoint_every == 0)
                if evaluate or save or done:  # before anything is written of these weights
                    self._check_finite_loss()
                if evaluate:
                    self._evaluate_and_log(bar)
                # at the end without an evaluation, _final_evaluation saves the state
                if save:
                    self.save_state()
                if done:
                    break

    def _check_finite_loss(self) -> None:
        """Raise :class:`TrainingDiverged` when a training loss since the last evaluation
        was not finite (every process raises: the flag is summed over them)."""
        bad = (~torch.isfinite(self._sums[:1])).double()
        if not float(all_reduce_sum(bad, self.dist)[0]):
            return
        first = self.step - self._sum_steps + 1
        saved = self.out / STATE_FILE
        kept = (
            f"{saved} holds the last state saved before it"
            if saved.exists()
            else "no state was saved before it"
        )
        raise TrainingDiverged(
            f"the training loss is not finite (NaN or inf) in steps {first}-{self.step}: the "
            f"model diverged, so nothing of it is written ({kept}); lower lr, or clip the "
            "gradients (clip_grad_norm)"
        )

    def _out_of_time(self) -> bool:
        """Whether ``max_time`` is spent: after every step for one process; with several,
        decided by process 0 for every process every 10 steps (so that they sync rarely and
        stop at the same step)."""
        if self.config.max_time is None:
            return False
        if not self.dist.active:
            return self.elapsed >= self.config.max_time
        if self.step % 10:
            return False
        spent = float(self.elapsed >= self.config.max_time) if self.dist.is_main else 0.0
        flag = all_reduce_sum(torch.tensor([spent], device=self.device), self.dist)
        return bool(flag.item() > 0)

    # ---------------------------------------------------------------------------------------
    # evaluation and logging

    def evaluate(self, frames: Sequence) -> dict[str, float]:
        """S2EF metrics of the current model (moving average if enabled) on ``frames``.

        Leaves the random state, the schedule and the training mode as they were.
        """
        devices = [self.device] if self.device.type == "cuda" else []
        batch_size = self.config.eval_batch_size or self.config.batch_size
        with torch.random.fork_rng(devices=devices), self._averaged():
            self.potential.eval()
            try:
                predictions = predict_frames(
                    self.potential,
                    frames,
                    batch_size,
                    self.device,
                    self.dist,
                )
            finally:
                self._train_mode()
        return s2ef_metrics(predictions)

    def _averaged(self) -> contextlib.AbstractContextManager:
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _train_summary(self) -> dict[str, float]:
        sums = all_reduce_sum(self._sums, self.dist).tolist()
        steps = self._sum_steps
        self._sums.zero_()
        self._sum_steps = 0
        return {
            "train_loss": sums[0] / max(steps, 1),
            "train_energy_mae": sums[1] / max(sums[2], 1.0),
            "train_forces_mae": sums[3] / max(sums[4], 1.0),
        }

    def _evaluate(self) -> tuple[dict[str, Any], float]:
        """A metrics row of the current model and its monitored score (lower is better)."""
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "lr": self.schedule.lr_at(max(self.step - 1, 0)),
            **self._train_summary(),
        }
        if len(self.val_frames):
            row.update({f"val_{k}": v for k, v in self.evaluate(self.val_frames).items()})
            monitored = row[f"val_{self.config.monitor}"]
            score = -monitored if self.config.monitor == "efwt" else monitored
        else:
            score = row["train_loss"]
        row["time"] = self.elapsed
        return row, score

    def _keep_if_best(self, row: dict[str, Any], score: float) -> None:
        if score < self.best:
            self.best = score
            self.export(self.out / BEST_FILE, row)

    def _evaluate_and_log(self, bar: tqdm) -> None:
        row, score = self._evaluate()
        self.schedule.report(score)
        self._keep_if_best(row, score)
        self.history.append(row)
        if self.dist.is_main:
            self._write_metrics(self.history)
            shown = {k: v for k, v in row.items() if k not in ("time",)}
            bar.write(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
                )
            )

    def _final_evaluation(self) -> dict[str, Any]:
        """The evaluation after the last step when that step had none: a metrics row marked
        ``"final": True`` and ``best.pt`` if it scores best, but neither the schedule, nor the
        resumable history, nor the running training-loss sums see it, so that a run extended
        with ``--resume`` continues as one that never stopped."""
        sums, steps = self._sums.clone(), self._sum_steps
        row, score = self._evaluate()
        self._sums.copy_(sums)
        self._sum_steps = steps
        row["final"] = True
        self._keep_if_best(row, score)
        if self.dist.is_main:
            self._write_metrics([*self.history, row])
        self.save_state()  # the state at the last step, with ``best``
        return row

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        write_text(self.out / "metrics.json", json.dumps(rows, indent=1))
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.out / "metrics.csv", buffer.getvalue())

    def _write_config(self) -> None:
        import yaml

        write_text(self.out / "config.yaml", yaml.safe_dump(self.config.as_dict(), sort_keys=False))

    # ---------------------------------------------------------------------------------------
    # checkpoints

    def _potential_record(self) -> dict[str, Any]:
        info = self.potential.info
        return {
            "model": info.model,
            "model_kwargs": dict(info.model_kwargs),
            "normalizers": info.normalizers.as_dict(),
            "source_format": info.source_format,
            "elements": info.elements,
            "metadata": info.metadata,
        }

    def save_state(self) -> Path | None:
        """Write the resumable state (process 0; every process takes part).

        Returns:
            The path written (``None`` on processes other than 0).
        """
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rng_all = all_gather_objects(rng, self.dist)
        # the running training-loss sums of every process since the last evaluation, summed:
        # they are what the next evaluation reports, whatever the number of processes resuming
        sums = all_reduce_sum(self._sums, self.dist)
        if not self.dist.is_main:
            return None
        state = {
            "format": TRAINING_STATE_FORMAT,
            "format_version": STATE_VERSION,
            "config": self.config.as_dict(),
            "potential": self._potential_record(),
            "model": {k: v.detach().cpu() for k, v in self.potential.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best": self.best,
            "history": self.history,
            "elapsed": self.elapsed,
            "sums": sums.cpu(),
            "sum_steps": self._sum_steps,
            "rng": rng_all,
            "world_size": self.dist.world_size,
            "data": self.data_info,
            "trained_pairs": {name: mask.cpu() for name, mask in self.trained_pairs.items()},
        }
        return torch_save(state, self.out / STATE_FILE)

    def _load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError("the saved run had no moving average; set ema_decay to none")
            self.ema.load_state_dict(state["ema"])
        saved = state["config"]
        changed = [
            name
            for name in RUN_DEFINING
            if name in saved and saved[name] != self.config.as_dict()[name]
        ]
        if changed:
            warn(
                f"resuming with other {', '.join(changed)} than the saved run's: it goes on "
                "from the saved step and data position, but is not a continuation of that run "
                "(to train further on new data, fine-tune from its best.pt instead)"
            )
        for name, mask in state.get("trained_pairs", {}).items():
            if name in self.trained_pairs:
                self.trained_pairs[name] |= mask.to(self.device)
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.best = float(state["best"])
        self.history = list(state["history"])
        self.elapsed = float(state["elapsed"])
        # the sums of every process, summed: restored on process 0 (the next evaluation adds
        # those of the others), not on each (they would be counted once per process)
        if self.dist.is_main:
            self._sums = state["sums"].to(device=self.device, dtype=torch.float64)
        self._sum_steps = int(state["sum_steps"])
        if int(state["world_size"]) != self.dist.world_size:
            warn(
                f"resuming a {state['world_size']}-process run with {self.dist.world_size} "
                "processes: random states are re-seeded, the run is not an exact continuation"
            )
            return
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def export(self, path: Path, metrics: dict[str, Any]) -> Path | None:
        """Write the model (moving average if enabled) in forcecalc's checkpoint format with
        the run's metadata (process 0 only)."""
        if not self.dist.is_main:
            return None
        info = self.potential.info
        record = CheckpointInfo(
            model=info.model,
            model_kwargs=dict(info.model_kwargs),
            normalizers=info.normalizers,
            source_format="forcecalc",
            elements=info.elements,
            metadata=dict(info.metadata),
        )
        metadata = {
            "training": {
                "config": self.config.as_dict(),
                "data": self.data_info,
                "metrics": metrics,
                "best_score": self.best,
                "step": self.step,
                "epoch": self.epoch,
                "hardware": self._hardware(),
                "wall_seconds": self.elapsed,
                "written": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }
        }
        with self._averaged():
            model = copy.deepcopy(self.potential.model)
        filled = fill_untrained_pairs(model, self.trained_pairs)  # frozen tables are kept
        if filled:
            metadata["training"]["filled_pairs"] = filled
        return save_checkpoint(Potential(model, record), path, metadata)

    def _hardware(self) -> dict[str, Any]:
        device = str(self.device)
        if self.device.type == "cuda":
            device = torch.cuda.get_device_name(self.device)
        return {
            "device": device,
            "processes": self.dist.world_size,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        }


def train(
    config: TrainConfig,
    train_frames: Sequence | None = None,
    val_frames: Sequence | None = None,
    resume: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run :class:`Trainer` to the end; returns :meth:`Trainer.fit`'s summary."""
    return Trainer(config, train_frames, val_frames, resume=resume, overwrite=overwrite).fit()
