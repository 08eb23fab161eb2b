"""The ``forcecalc train`` and ``forcecalc finetune`` subcommands.

Every :class:`~forcecalc.train.config.TrainConfig` option is a flag (``lr`` -> ``--lr``,
``freeze_except`` -> ``--freeze-except``); values come from, in increasing priority: the
defaults, (``finetune``: a lower learning rate), ``--config FILE``, the flags.  Under
``torchrun`` every process runs the same command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from forcecalc.train.config import TrainConfig, option_fields, read_options

#: Defaults of ``finetune`` that differ from ``train``'s.
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 1e-4}


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _add_option_flags(
    parser: argparse.ArgumentParser,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per config option; absent flags leave the config's value alone.  ``defaults``:
    the command's own defaults where they differ from the config's (shown in the help)."""
    group = parser.add_argument_group("training options (also settable in --config)")
    for name, annotation, default, help_text in option_fields():
        if name in skip:
            continue
        default = (defaults or {}).get(name, default)
        flag = "--" + name.replace("_", "-")
        text = help_text if "default" in help_text else f"{help_text} (default: {default})"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        if annotation == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif annotation.startswith("list["):
            item = float if "float" in annotation else str
            kwargs.update(nargs="+", type=item, metavar="VALUE")
        elif annotation.startswith("dict["):
            kwargs.update(type=_json_object, metavar="JSON")
        else:
            kind = {"int": int, "float": float, "str": str}[annotation.split(" | ")[0]]
            kwargs["type"] = _none_or(kind) if "None" in annotation else kind
        group.add_argument(flag, **kwargs)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML or JSON file of options")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="STATE",
        help="continue a killed or finished run from STATE, a training state or a run's "
        "folder (default: OUT/checkpoint.pt); without --config the run's own options are "
        "used, flags override them",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an OUT folder that holds another run, whose files are "
        "removed once the new run's first step has succeeded (else an error)",
    )


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``finetune`` on the ``forcecalc`` command's subparsers."""
    train = subparsers.add_parser(
        "train",
        help="train a SpinConv or ForceNet model on your own DFT frames",
        description="Train a model from scratch. Data: HDF5, ASE db, extxyz, traj, OUTCAR or "
        "any file ASE reads. Multi-GPU: torchrun --nproc-per-node=N -m forcecalc train ...",
    )
    _add_common(train)
    _add_option_flags(train)
    train.set_defaults(func=_cmd_train)

    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune a checkpoint (OCP's or ours) on your own DFT frames",
        description="Continue training CHECKPOINT (a file, a shipped name or an OCP name) on "
        "new data, optionally only some blocks (--freeze-except force_output_block).",
    )
    finetune.add_argument("checkpoint", help="the checkpoint to start from")
    _add_common(finetune)
    _add_option_flags(finetune, skip=("init_checkpoint", "model"), defaults=FINETUNE_DEFAULTS)
    finetune.set_defaults(func=_cmd_finetune)


def _option_values(args: argparse.Namespace) -> dict[str, Any]:
    names = {name for name, *_ in option_fields()}
    return {k: v for k, v in vars(args).items() if k in names}


def build_config(
    args: argparse.Namespace, base: dict[str, Any] | None = None
) -> tuple[TrainConfig, Path | None]:
    """The run's config and the state to resume from (if ``--resume``).

    Values, in increasing priority: the defaults, ``base`` (``finetune``'s defaults), the
    options ``--config`` sets (only those it names), the flags given."""
    from forcecalc.train.trainer import read_training_state

    values: dict[str, Any] = dict(base or {})
    if args.config:
        values.update(read_options(args.config))
    flags = _option_values(args)
    resume = None
    if args.resume is not None:
        out = Path(flags.get("out", values.get("out", TrainConfig().out)))
        resume = Path(args.resume) if args.resume else out / "checkpoint.pt"
        if resume.is_dir():  # a run's folder: its training state
            resume = resume / "checkpoint.pt"
        if not resume.exists():
            raise FileNotFoundError(f"no training state to resume at {resume}")
        if not args.config:
            values.update(read_training_state(resume)["config"])
    values.update(flags)
    return TrainConfig.from_dict(values), resume


def _run(config: TrainConfig, resume: Path | None, overwrite: bool) -> int:
    from forcecalc.train.distributed import leave_process_group
    from forcecalc.train.trainer import Trainer

    trainer = Trainer(config, resume=resume, overwrite=overwrite)
    summary = trainer.fit()
    leave_process_group()
    if trainer.dist.is_main:
        metrics = {k: v for k, v in summary["metrics"].items() if k.startswith("val_")}
        print(json.dumps({"final": summary["final"], "step": summary["step"], **metrics}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    config, resume = build_config(args)
    if not config.data and resume is None:
        raise SystemExit("forcecalc train: give --data (or data: in --config)")
    return _run(config, resume, args.overwrite)


def _cmd_finetune(args: argparse.Namespace) -> int:
    config, resume = build_config(args, base=FINETUNE_DEFAULTS)
    config = config.updated(init_checkpoint=args.checkpoint)
    if not config.data:
        raise SystemExit("forcecalc finetune: give --data (or data: in --config)")
    return _run(config, resume, args.overwrite)
