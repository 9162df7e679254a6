"""`lungxray`: the parser, made of each command group's, and the one place errors become exit codes
(2: a usage or input error, said in one line; 130: interrupted)."""

from __future__ import annotations

import argparse
import logging
import sys

from lungxray.cli.data import add_data_commands
from lungxray.cli.dicom import add_dicom_commands
from lungxray.cli.evaluate import add_evaluate_commands
from lungxray.cli.federate import add_federate_commands
from lungxray.cli.models import add_model_commands
from lungxray.cli.monitor import add_monitor_command
from lungxray.cli.predict import add_predict_command
from lungxray.cli.serve import add_serve_commands
from lungxray.cli.train import add_train_command, config_from_args
from lungxray.errors import LungxrayError

# Modules the base install lacks, and the extra that brings each (pyproject.toml).
EXTRA_PROVIDING = {"tensorflow": "full", "keras": "full", "sklearn": "full", "matplotlib": "full", "scipy": "full",
                   "imagehash": "full", "pyarrow": "full", "onnxruntime": "onnx", "tf2onnx": "onnx", "ray": "ray",
                   "pynetdicom": "dicom", "highdicom": "dicom", "torch": "convert", "flwr": "federated"}

__all__ = ["build_parser", "config_from_args", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # pydicom logs its decoders' tracebacks; the file's one-line reason reaches the user as an ImageError.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it logs every PDU at INFO
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every attribute an SR copies at INFO
    try:
        return args.run(args) or 0
    except LungxrayError as error:
        print(f"lungxray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        extra = EXTRA_PROVIDING.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"lungxray {args.command}: error: this needs {error.name}, which the base install leaves out "
              f"(it runs exported models); pip install 'lungxray[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lungxray {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungxray", description="Chest X-ray classification with Keras.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_commands in (add_train_command, add_evaluate_commands, add_predict_command, add_serve_commands,
                         add_model_commands, add_dicom_commands, add_data_commands, add_monitor_command,
                         add_federate_commands):
        add_commands(commands)
    return parser
