"""`lungxray federate simulate`: the recipe's head trained by federation (pip install 'lungxray[federated]')."""

from __future__ import annotations

import dataclasses

from lungxray.cli.common import cache_dir
from lungxray.cli.train import add_settings_arguments, config_from_args, print_run
from lungxray.config import PRESETS, Federation


def add_federate_commands(commands) -> None:
    federate = commands.add_parser("federate", help="train across sites that keep their films (Flower)")
    modes = federate.add_subparsers(dest="mode", required=True)
    simulate = modes.add_parser("simulate", help="every site of a manifest a simulated Flower client on this machine")
    simulate.add_argument("--data", required=True, help="manifest CSV (or any layout) whose site column names each "
                                                        "film's hospital")
    simulate.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    start = simulate.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                       help="the recipe to start from (default: reference)")
    start.add_argument("--config", help="JSON configuration file to start from")
    simulate.add_argument("--cache", help="feature cache folder (default: $LUNGXRAY_CACHE or ~/.cache/lungxray)")
    add_settings_arguments(simulate.add_argument_group("federation"), Federation)
    add_settings_arguments(simulate.add_argument_group("recipe settings (each overrides the preset or --config)"))
    simulate.set_defaults(run=run_simulate)


def run_simulate(args) -> int:
    from lungxray.federated import simulate

    federation = Federation(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Federation)
                               if getattr(args, f.name) is not None})
    result = simulate(args.data, args.out, config_from_args(args), federation, cache_dir=cache_dir(args))
    print_run(result)
    return 0
