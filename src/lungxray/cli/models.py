"""`lungxray export` and `lungxray convert-backbone`: a model taken to another runtime, a backbone
taken from another framework."""

from __future__ import annotations

from lungxray.cli.common import cache_dir


def add_model_commands(commands) -> None:
    export = commands.add_parser("export", help="the whole model as one LiteRT, ONNX or SavedModel export, "
                                                "checked against Keras")
    export.add_argument("--model", required=True, help="run folder or .keras file")
    export.add_argument("--format", choices=["litert", "onnx", "savedmodel"], default="litert",
                        help="(default: litert)")
    export.add_argument("--out", help="where to write it (default: RUN/export/model.tflite, .onnx or .savedmodel)")
    export.add_argument("--data", help="images to check the export on (default: the run's validation split)")
    export.add_argument("--sample", type=int, default=200, help="how many images to check it on (default: 200)")
    export.add_argument("--cache", help="feature cache folder")
    export.set_defaults(run=run_export)

    convert = commands.add_parser("convert-backbone", help="a TorchXRayVision DenseNet121 checkpoint as the weights "
                                                          "of --backbone DenseNet121-XRV")
    convert.add_argument("checkpoint", help="a PyTorch checkpoint: a state dict, or with --trust-pickle a whole model")
    convert.add_argument("--out", required=True, help="the Keras weights file to write (NAME.weights.h5)")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="unpickle a whole saved model (this runs code from the file: only for a trusted one)")
    convert.set_defaults(run=run_convert_backbone)


def run_export(args) -> int:
    from lungxray.infer.export import export_model

    result = export_model(args.model, args.out, args.data, args.sample, cache_dir(args), args.format)
    parity = result.parity
    print(f"exported: {result.path} (and its .json and .ood.npz); checked on {parity['images']} "
          f"images: largest probability difference {parity['max_abs_difference']:.2e} (tolerance "
          f"{parity['tolerance']:.0e}), same class for {parity['label_agreement']:.1%}")
    return 0


def run_convert_backbone(args) -> int:
    from lungxray.convert.torchxrayvision import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out, args.trust_pickle)
    print(f"wrote {out}: train on it with --backbone DenseNet121-XRV --weights {out}")
    return 0
