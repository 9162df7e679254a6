"""`lungxray train`: the recipe, with one flag per Config field."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from lungxray.cli.common import cache_dir, cluster
from lungxray.config import PRESETS, Config
from lungxray.rundir import RunDir


def add_train_command(commands) -> None:
    train = commands.add_parser("train", help="train the recipe and evaluate on the test split")
    train.add_argument("--data", required=True, help="reference layout folder, class folders or manifest CSV")
    train.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                       help="the recipe to start from; the settings below change it (default: reference)")
    start.add_argument("--config", help="JSON configuration file to start from (a run's config.json reruns it)")
    start.add_argument("--resume", action="store_true",
                       help="continue the interrupted run in --out, with the configuration saved there")
    train.add_argument("--cache", help="feature cache folder (default: $LUNGXRAY_CACHE or ~/.cache/lungxray)")
    train.add_argument("--extract-engine", choices=["local", "ray"], default="local",
                       help="compute the backbone features the cache lacks here or on Ray workers "
                            "(pip install 'lungxray[ray]'); the model is the same (default: local)")
    train.add_argument("--address", help="with --extract-engine ray: the Ray cluster (ray://HOST:PORT or auto; "
                                         "default: start one here)")
    train.add_argument("--workers", type=int, help="with --extract-engine ray: workers, one core each (default: all)")
    train.add_argument("--strategy", choices=["auto", "none", "mirrored", "multi-worker"], default="auto",
                       help="tf.distribute for Keras' fit: multi-worker runs this command on every worker named "
                            "in TF_CONFIG (auto: multi-worker when TF_CONFIG is set, mirrored on 2+ GPUs, else none)")
    add_settings_arguments(train.add_argument_group("settings (each overrides the preset or --config)"))
    train.set_defaults(run=run_train)


def add_settings_arguments(group, settings: type = Config) -> None:
    """One flag per field of a settings dataclass (`Config`, `Federation`), with its help, type,
    choices and default."""
    hints = typing.get_type_hints(settings)
    for field in dataclasses.fields(settings):
        flag, check = "--" + field.name.replace("_", "-"), field.metadata["check"]
        help_text = field.metadata["help"]
        if field.default is not dataclasses.MISSING and field.default is not None:
            help_text += f" (default: {_shown(field.default)})"
        kind, arguments = hints[field.name], typing.get_args(hints[field.name])
        if type(None) in arguments:  # Optional[X]: the flag takes an X
            kind = next(a for a in arguments if a is not type(None))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag, type=_numbers, metavar="A,B,C", help=help_text)
        else:
            group.add_argument(flag, type=kind, choices=check if isinstance(check, tuple) else None,
                               metavar=None if isinstance(check, tuple) else field.name.split("_")[-1].upper(),
                               help=help_text)


def _shown(value) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers such as 0.7,0.2,0.1") from None


def config_from_args(args) -> Config:
    """The preset or --config file, with every setting given on the command line applied (validated)."""
    config = Config.load(args.config) if args.config else Config.preset(args.preset)
    return config.replace(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})




def run_train(args) -> int:
    from lungxray.training.distribute import is_chief
    from lungxray.training.recipe import train

    settings = [f.name for f in dataclasses.fields(Config) if getattr(args, f.name) is not None]
    config = None if args.resume and not settings else config_from_args(args)
    result = train(args.data, args.out, config, cache_dir=cache_dir(args), resume=args.resume,
                   cluster=cluster(args, args.extract_engine), strategy=args.strategy)
    if not is_chief():
        print("worker done; the chief wrote the run folder")
        return 0
    print_run(result)
    return 0


def print_run(result) -> None:
    """A finished run in a few lines: its folder, its test figures and its report."""
    print(f"run folder: {result.run_dir}")
    if result.test_metrics:
        print(f"test accuracy {result.test_metrics['accuracy']:.4f}, macro F1 {result.test_metrics['macro_f1']:.4f}")
    if result.external_metrics:
        print(f"external test (the held-out source) accuracy {result.external_metrics['accuracy']:.4f}")
    print(f"report: {result.run_dir / RunDir.REPORT}")
