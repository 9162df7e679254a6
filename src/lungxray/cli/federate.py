"""`lungxray federate simulate|server|site`: the recipe's head trained by federation
(pip install 'lungxray[federated]')."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lungxray.cli.common import cache_dir
from lungxray.cli.train import add_settings_arguments, config_from_args, print_run
from lungxray.config import PRESETS, Config, Federation
from lungxray.errors import ConfigError

RECIPE_CLASSES = "covid,normal,pneumonia"


def add_federate_commands(commands) -> None:
    federate = commands.add_parser("federate", help="train across sites that keep their films (Flower)")
    modes = federate.add_subparsers(dest="mode", required=True)

    simulate = modes.add_parser("simulate", help="every site of a manifest a simulated Flower client on this machine")
    simulate.add_argument("--data", required=True, help="manifest CSV (or any layout) whose site column names each "
                                                        "film's hospital")
    simulate.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    add_recipe_arguments(simulate)
    add_settings_arguments(simulate.add_argument_group("federation"), Federation)
    add_settings_arguments(simulate.add_argument_group("recipe settings (each overrides the preset or --config)"))
    simulate.set_defaults(run=run_simulate)

    server = modes.add_parser("server", help="coordinate sites across the network: Flower's SuperLink, TLS, "
                                             "only the sites whose keys are given (docs/federated.md)")
    server.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    server.add_argument("--resume", action="store_true",
                        help="continue the federation in --out that a crash stopped, from its last finished round, "
                             "with the settings saved there")
    server.add_argument("--site-key", action="append", required=True, metavar="PUBLIC_KEY",
                        help="a site's public key (ssh-keygen -t ecdsa -b 384); once per site")
    server.add_argument("--tls-cert", required=True, help="the server's TLS certificate (PEM), naming the address "
                                                          "the sites use and 127.0.0.1")
    server.add_argument("--tls-key", required=True, help="its private key (PEM)")
    server.add_argument("--tls-ca", required=True, help="the CA certificate that signed it (PEM)")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    server.add_argument("--port", type=int, default=9092, help="port for the sites and Flower's own CLI "
                                                               "(default: 9092)")
    server.add_argument("--classes", default=RECIPE_CLASSES, help=f"the classes, as every site's data names them "
                                                                  f"(default: {RECIPE_CLASSES})")
    add_recipe_arguments(server)
    add_settings_arguments(server.add_argument_group("federation"), Federation)
    add_settings_arguments(server.add_argument_group("recipe settings (each overrides the preset or --config)"))
    server.set_defaults(run=run_server)

    site = modes.add_parser("site", help="one hospital's client: make its features, then run its Flower SuperNode")
    site.add_argument("--data", required=True, help="this site's films: a folder in the reference layout or a "
                                                    "manifest CSV")
    site.add_argument("--name", required=True, help="this site's name, as the server's report shows it")
    site.add_argument("--out", required=True, help="this site's folder: its split, its features (kept here)")
    site.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server's address")
    site.add_argument("--tls-ca", required=True, help="the CA certificate that signed the server's (PEM)")
    site.add_argument("--key", required=True, help="this site's private key (its public half given to the server)")
    site.add_argument("--port", type=int, default=9094, help="port of the SuperNode's ClientApp API on this "
                                                             "machine (default: 9094)")
    site.add_argument("--classes", default=RECIPE_CLASSES, help=f"the federation's classes, of which this site may "
                                                                f"hold some only (default: {RECIPE_CLASSES})")
    add_recipe_arguments(site)
    add_settings_arguments(site.add_argument_group("recipe settings (each overrides the preset or --config)"))
    site.set_defaults(run=run_site)


def add_recipe_arguments(parser) -> None:
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                       help="the recipe to start from (default: reference)")
    start.add_argument("--config", help="JSON configuration file to start from")
    parser.add_argument("--cache", help="feature cache folder (default: $LUNGXRAY_CACHE or ~/.cache/lungxray)")


def federation_from_args(args) -> Federation:
    return Federation(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Federation)
                         if getattr(args, f.name) is not None})


def run_simulate(args) -> int:
    from lungxray.federated import simulate

    result = simulate(args.data, args.out, config_from_args(args), federation_from_args(args),
                      cache_dir=cache_dir(args))
    print_run(result)
    return 0


def run_server(args) -> int:
    from lungxray.federated.deployment import coordinate

    settings = [f.name for f in (*dataclasses.fields(Config), *dataclasses.fields(Federation))
                if getattr(args, f.name) is not None]
    if args.resume and (settings or args.config):
        raise ConfigError(f"--resume continues with the settings saved in --out; leave out "
                          f"{', '.join('--' + name.replace('_', '-') for name in settings) or '--config'}")
    config, federation = (None, None) if args.resume else (config_from_args(args), federation_from_args(args))
    result = coordinate(args.out, config, federation, args.classes.split(","), [Path(key) for key in args.site_key],
                        Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca), args.host, args.port,
                        cache_dir=cache_dir(args), resume=args.resume)
    print_run(result)
    return 0


def run_site(args) -> int:
    from lungxray.federated.deployment import join

    join(args.data, args.name, args.out, args.superlink, Path(args.tls_ca), Path(args.key), config_from_args(args),
         args.classes.split(","), args.port, cache_dir=cache_dir(args))
    return 0
