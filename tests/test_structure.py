"""The shape of the package: imports run one way, commands that need no model start without
TensorFlow, the run folder and metrics.json have one owner each, Config validates at the boundary."""

import argparse
import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lungxray.cli import build_parser, config_from_args, main
from lungxray.config import PRESETS, Config
from lungxray.errors import ConfigError, DataError, WeightsError
from lungxray.evaluate.schema import read_metrics
from lungxray.rundir import RunDir

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lungxray"

# Lower layers never import higher ones. Within a layer, modules may import each other.
LAYERS = [
    {"errors", "io", "parallel", "config", "rundir", "environment"},
    {"data"},
    {"model", "cluster"},
    {"infer", "convert"},
    {"evaluate"},
    {"training"},
    {"serve", "dicom", "monitor", "federated"},
    {"cli", "__init__"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def _imports(path: Path) -> set[str]:
    """lungxray modules `path` imports at run time (imports under TYPE_CHECKING are only types)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lungxray."):
            found.add(node.module.removeprefix("lungxray."))
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("lungxray.") for a in node.names if a.name.startswith("lungxray.")}
    return found


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for imported in _imports(path):
            if _layer(imported) > _layer(module):
                wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong


def test_every_module_has_a_layer():
    modules = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.glob("*") if p.suffix == ".py"
               or (p.is_dir() and (p / "__init__.py").exists())}
    assert modules <= set().union(*LAYERS), modules - set().union(*LAYERS)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["compare", "--help"],
                                  ["data", "fetch", "--print-path", "--dest", "{dest}"]])
def test_commands_without_a_model_do_not_import_tensorflow(argv, tmp_path):
    (tmp_path / "Dataset" / "Dataset").mkdir(parents=True)  # an already fetched dataset
    for split in ("train", "val", "test"):
        (tmp_path / "Dataset" / "Dataset" / split).mkdir()
    code = ("import sys\nfrom lungxray.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('TENSORFLOW' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'LIGHT')")
    argv = [a.format(dest=tmp_path) for a in argv]
    output = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60).stdout
    assert output.strip().splitlines()[-1] == "LIGHT"


def test_package_names_load_on_first_use():
    code = ("import sys, lungxray\nassert 'tensorflow' not in sys.modules\n"
            "from lungxray import Config, train\nassert callable(train) and Config().epochs == 30\n"
            "import lungxray.training.recipe\nfrom lungxray import train as again\nassert again is train\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("values,message", [
    ({"dense_units": -4}, "'dense_units' must be an int in the range [1, inf). Got -4 instead."),
    ({"early_stopping_patience": -1}, "'early_stopping_patience' must be an int in the range [1, inf). Got -1"),
    ({"weights": 5}, "'weights' must be a str. Got 5 instead."),
    ({"epochs": "30"}, "'epochs' must be an int. Got '30' instead."),
    ({"epochs": True}, "'epochs' must be an int. Got True instead."),
    ({"dropout": 1.0}, "'dropout' must be a float in the range [0, 1). Got 1.0 instead."),
    ({"pooling": "min"}, "'pooling' must be one of ['max', 'avg']. Got 'min' instead."),
    ({"split_ratios": [0.5, 0.5]}, "'split_ratios' must be a list of 3 numbers"),
    ({"split_ratios": [0.5, 0.4, 0.4]}, "summing to 1"),
    ({"holdout_source": 3}, "'holdout_source' must be a str. Got 3 instead."),
])
def test_config_says_what_is_wrong(values, message):
    with pytest.raises(ConfigError) as caught:
        Config(**values)
    assert message in str(caught.value)


def test_config_converts_what_json_cannot_express():
    config = Config.from_dict({"learning_rate": 1, "split_ratios": [0.8, 0.1, 0.1], "holdout_source": None})
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.split_ratios == (0.8, 0.1, 0.1)
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("content,message", [
    ('{"epochs": "ten"}', "'epochs' must be an int. Got 'ten' instead."),
    ('{"epoch": 3}', "unknown setting(s) ['epoch']"),
    ("[1, 2]", "must be a JSON object of settings"),
    ("{not json", "is not valid JSON"),
])
def test_bad_config_file_gives_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert main(["train", "--data", str(tmp_path), "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and len(err.splitlines()) == 1


def test_every_setting_has_a_flag_with_its_default_in_help():
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = " ".join(train.format_help().split())
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        assert flag in help_text, flag
        if field.default not in (dataclasses.MISSING, None):
            assert "(default: " in help_text.split(flag, 2)[-1][:400], flag


def test_flags_override_the_preset_and_nothing_else():
    args = build_parser().parse_args(["train", "--data", "d", "--epochs", "5", "--no-horizontal-flip",
                                      "--split-ratios", "0.6,0.2,0.2", "--pooling", "avg"])
    config = config_from_args(args)
    assert (config.epochs, config.horizontal_flip, config.split_ratios, config.pooling) == (5, False, (0.6, 0.2, 0.2),
                                                                                            "avg")
    unchanged = {f.name for f in dataclasses.fields(Config)} - {"epochs", "horizontal_flip", "split_ratios", "pooling"}
    assert all(getattr(config, name) == getattr(Config(), name) for name in unchanged)
    assert config_from_args(build_parser().parse_args(["train", "--data", "d"])) == Config.preset("reference")
    assert PRESETS["reference"] == {}


def test_run_dir_resolves_a_folder_or_a_model_file(tmp_path):
    run = RunDir.create(tmp_path / "run")
    with pytest.raises(WeightsError, match="no model at"):
        RunDir.open(run.folder)
    run.model.write_bytes(b"model")
    assert RunDir.open(run.folder).model == run.model
    by_file = RunDir.open(run.model)
    assert by_file.folder == run.folder and by_file.model_info == run.folder / "model.json"
    with pytest.raises(DataError, match="already holds a trained model"):
        RunDir.create(run.folder)
    legacy = tmp_path / "old.h5"
    legacy.write_bytes(b"h5")
    with pytest.raises(WeightsError, match="only .keras models"):
        RunDir.open(legacy)


def test_metrics_reader_names_the_file_and_the_missing_keys(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(DataError, match=r"metrics.json lacks \[.*'classes'"):
        read_metrics(tmp_path)
    with pytest.raises(DataError, match="evaluate the model first"):
        read_metrics(tmp_path / "elsewhere")


def test_crafted_model_files_are_refused(tmp_path):
    """A Lambda layer (arbitrary code) and a config that switches safe mode off are refused by safe-mode loading."""
    import zipfile

    import keras

    from lungxray.infer.keras_predictor import KerasPredictor

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    lambda_run = tmp_path / "lambda"
    lambda_run.mkdir()
    model.save(lambda_run / "model.keras")
    (lambda_run / "model.json").write_text(json.dumps({"classes": ["a"], "image_size": 32}))
    with pytest.raises(WeightsError, match="not a loadable Keras model"):
        KerasPredictor.load(lambda_run)

    with zipfile.ZipFile(lambda_run / "model.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    layer = next(entry for entry in config["config"]["layers"] if entry["class_name"] == "Lambda")
    layer["config"]["function"] = {"module": "keras.config", "class_name": "function", "registered_name": "function",
                                   "config": "enable_unsafe_deserialization"}
    members["config.json"] = json.dumps(config).encode()
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    with zipfile.ZipFile(crafted / "model.keras", "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    (crafted / "model.json").write_text(json.dumps({"classes": ["a"], "image_size": 32}))
    with pytest.raises(WeightsError, match="not a loadable Keras model"):
        KerasPredictor.load(crafted)
    from keras.src.saving.serialization_lib import in_safe_mode

    assert in_safe_mode() is not False  # the crafted config did not switch safe mode off


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted(PACKAGE.rglob("*.py")) for node in _functions(path)
            if node.end_lineno - node.lineno + 1 > 60]
    assert not long, long


def _is_logic_free(statement: ast.stmt) -> bool:
    """A docstring, an import, `__all__`, or names bound by lazy_loader.attach (lazy re-exports)."""
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
        return True
    if isinstance(statement, ast.Assign):
        names = {getattr(t, "id", None) for t in statement.targets} | {
            getattr(e, "id", None) for t in statement.targets if isinstance(t, ast.Tuple) for e in t.elts}
        value = statement.value
        attach = isinstance(value, ast.Call) and getattr(value.func, "attr", "") == "attach"
        return names <= {"__all__", "__version__", "__getattr__", "__dir__", None} and (
            attach or isinstance(value, (ast.List, ast.Constant)) or names == {"__all__"})
    return False


def test_init_files_only_re_export():
    busy = [f"{path.relative_to(PACKAGE)}:{statement.lineno}" for path in sorted(PACKAGE.rglob("__init__.py"))
            for statement in ast.parse(path.read_text()).body if not _is_logic_free(statement)]
    assert not busy, busy


def test_predictors_are_typed_not_probed():
    """Every runtime implements the `Predictor` protocol: nothing asks a predictor what it has."""
    probes = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in sorted(PACKAGE.rglob("*.py"))
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr", "getattr")
              and node.args and "predictor" in ast.unparse(node.args[0])]
    assert not probes, probes


def test_the_withhold_rule_is_written_once():
    """Only the answer module decides what a flagged film gets; every output reads its decision."""
    deciding = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
                if "refuse_ood and" in path.read_text() or "and refuse_ood" in path.read_text()
                or "OOD_NOTE)" in path.read_text()]
    assert deciding == ["infer/answer.py"], deciding


def _commands(parser, path=()):
    """(command path, its flags) for every command the parser runs."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield path, {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    for group in groups:
        for name, sub in group.choices.items():
            yield from _commands(sub, (*path, name))


def test_every_flag_is_in_the_readme_synopsis_of_its_command():
    """The README's command-line block names every flag of every command beside that command (the
    settings of `train` and `federate`, one per Config field, stand there as
    `[--SETTING VALUE ...]`; a boolean flag's `--no-` form goes without saying)."""
    root = PACKAGE.parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    entries = [part for part in block.split("\nlungxray ") if part.strip()]
    settings = {f"--{prefix}{f.name.replace('_', '-')}" for f in dataclasses.fields(Config) for prefix in ("", "no-")}
    missing = []
    for path, flags in _commands(build_parser()):
        synopsis = " ".join(e for e in entries if e.lstrip().startswith(path[0]) and all(w in e for w in path[1:]))
        assert synopsis, f"no synopsis of lungxray {' '.join(path)} in the README"
        missing += [f"{' '.join(path)} {flag}" for flag in sorted(flags) if flag not in synopsis
                    and not ((path == ("train",) or path[0] == "federate") and flag in settings)
                    and not (flag.startswith("--no-") and f"--{flag[5:]}" in synopsis)]  # a listed flag's negation
    assert not missing, missing


def test_the_architecture_map_names_every_module():
    """docs/usage.md#architecture names every module and package of src/lungxray."""
    section = (PACKAGE.parents[1] / "docs" / "usage.md").read_text().split("## Architecture", 1)[1].split("\n## ")[0]
    names = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    names |= {p.stem for sub in ("infer", "model", "training", "evaluate", "serve", "dicom", "federated", "cli")
              for p in (PACKAGE / sub).glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert not {n for n in names if n not in section}, {n for n in names if n not in section}
