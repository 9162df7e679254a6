"""The `lungxray` command line: one module per command group, each parsing and calling the library."""

from lungxray.cli.main import build_parser, config_from_args, main

__all__ = ["build_parser", "config_from_args", "main"]
