import json

import keras
import numpy as np
import pytest

from lungxray import Config, KerasPredictor, train
from lungxray.errors import ConfigError, DataError
from lungxray.data.images import read_image
from lungxray.model.network import build_backbone
from tests.conftest import TINY


def tiny_config(**overrides) -> Config:
    values = dict(weights="none", image_size=TINY, epochs=3, batch_size=8, dense_units=16, feature_runtime="keras")
    values.update(overrides)
    return Config(**values)


@pytest.mark.parametrize("views", [2, 4])
def test_engines_train_the_same_head(split_folders, tmp_path, cache_dir, views):
    """Same seed, same batches, same views: both engines give the same model. With 4 views, the
    Keras engine makes each film's variants as it reads it, the cached engine cached their features.

    Tolerance: 1e-4 on probabilities. The cached engine computes backbone features once, the
    Keras engine at each step; the same float32 operations in a different batch grouping differ
    only by rounding (~1e-6 here)."""
    runs = {engine: train(split_folders, tmp_path / engine, tiny_config(engine=engine, views=views),
                          cache_dir=cache_dir) for engine in ("keras", "cached")}
    np.testing.assert_allclose(runs["keras"].history["loss"], runs["cached"].history["loss"], atol=1e-4)
    np.testing.assert_allclose(runs["keras"].history["val_loss"], runs["cached"].history["val_loss"], atol=1e-4)
    files = sorted(split_folders.rglob("*.png"))
    probabilities = {e: KerasPredictor.load(r.run_dir, runtime="keras", cache_dir=cache_dir).predict_files(files).probabilities
                     for e, r in runs.items()}
    np.testing.assert_allclose(probabilities["keras"], probabilities["cached"], atol=1e-4)
    np.testing.assert_allclose(probabilities["cached"].sum(axis=1), 1.0, atol=1e-5)


def test_a_different_seed_trains_differently(split_folders, tmp_path, cache_dir):
    a = train(split_folders, tmp_path / "a", tiny_config(seed=1), cache_dir=cache_dir)
    b = train(split_folders, tmp_path / "b", tiny_config(seed=2), cache_dir=cache_dir)
    assert a.history["loss"] != b.history["loss"]


def test_run_folder_holds_every_artefact_and_reruns_from_config(split_folders, tmp_path, cache_dir):
    result = train(split_folders, tmp_path / "run", tiny_config(), cache_dir=cache_dir)
    run = result.run_dir
    for name in ["config.json", "data.csv", "model.keras", "model.json", "history.csv", "loss.png", "accuracy.png",
                 "report.md", "evaluation/metrics.json", "evaluation/confusion_matrix.png",
                 "evaluation/confusion_matrix_normalized.png", "evaluation/classification_report.txt",
                 "checkpoints/head.weights.h5", "ood.npz", "train_hashes.txt", "timings.json"]:
        assert (run / name).is_file(), name
    assert len((run / "history.csv").read_text().strip().splitlines()) == 1 + 3
    metrics = json.loads((run / "evaluation/metrics.json").read_text())
    assert metrics["classes"] == ["covid", "normal", "pneumonia"]
    assert np.array(metrics["confusion_matrix"]).sum() == 18
    assert set(metrics["per_class"]["covid"]) >= {"precision", "recall", "f1", "support"}
    report = (run / "report.md").read_text()
    assert "evaluation/metrics.json" in report and "loss.png" in report
    # Written from this run's configuration, not the reference's.
    assert "Dense(16, relu)" in report and "32x32 input" in report and "best val_accuracy" in report
    assert "Dense(16, relu)" in json.loads((run / "model.json").read_text())["architecture"]
    rerun = train(split_folders, tmp_path / "rerun", Config.load(run / "config.json"), cache_dir=cache_dir)
    assert rerun.history["loss"] == pytest.approx(result.history["loss"], abs=1e-6)


def test_refuses_to_overwrite_a_run(split_folders, tmp_path, cache_dir):
    first = train(split_folders, tmp_path / "run", tiny_config(epochs=1, monitor="val_loss"), cache_dir=cache_dir)
    assert "best val_loss" in (first.run_dir / "report.md").read_text()
    with pytest.raises(DataError, match="already holds a trained model"):
        train(split_folders, tmp_path / "run", tiny_config(epochs=1), cache_dir=cache_dir)


def test_unreadable_images_are_reported_and_left_out(split_folders, tmp_path, cache_dir):
    bad = split_folders / "train" / "covid" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    (split_folders / "train" / "normal" / "empty.png").write_bytes(b"")
    config = tiny_config(epochs=1, max_unreadable_fraction=0.1)
    result = train(split_folders, tmp_path / "run", config, cache_dir=cache_dir)
    listed = (result.run_dir / "unreadable.csv").read_text()
    assert "broken.png" in listed and "empty.png" in listed
    with pytest.raises(DataError, match="unreadable, more than max_unreadable_fraction"):
        train(split_folders, tmp_path / "strict", tiny_config(epochs=1, max_unreadable_fraction=0.01),
              cache_dir=cache_dir)


def test_class_with_no_readable_image_stops_training(split_folders, tmp_path, cache_dir):
    for path in (split_folders / "val" / "covid").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="class 'covid' has no readable images in the val split"):
        train(split_folders, tmp_path / "run", tiny_config(epochs=1, max_unreadable_fraction=1.0), cache_dir=cache_dir)


def test_fine_tuning_trains_the_top_of_the_backbone(split_folders, tmp_path, cache_dir):
    config = tiny_config(epochs=2, fine_tune_epochs=1, fine_tune_layers=5)
    result = train(split_folders, tmp_path / "tuned", config, cache_dir=cache_dir)
    assert len(result.history["loss"]) == 3 and "fine_tuning" in result.timings
    assert len((result.run_dir / "history.csv").read_text().strip().splitlines()) == 1 + 3
    tuned_backbone = KerasPredictor.load(result.run_dir, runtime="keras", cache_dir=cache_dir).backbone
    keras.utils.set_random_seed(config.seed)  # as train() does before it builds the backbone: its starting weights
    frozen_backbone = build_backbone(config.weights, config.image_size, config.pooling)
    changed = {layer.name: any(not np.array_equal(a, b) for a, b in zip(layer.get_weights(),
                                                                      frozen_backbone.get_layer(layer.name).get_weights()))
               for layer in tuned_backbone.layers if layer.get_weights()}
    # The last 5 layers are add, conv_1, conv_1_bn (kept frozen), activation, pooling: only conv_1 learns.
    assert [name for name, moved in changed.items() if moved] == ["conv_1"]



def test_fine_tuning_on_cached_block_inputs_trains_what_end_to_end_fine_tuning_trains(split_folders, tmp_path,
                                                                                      cache_dir):
    """train_from: the blocks from it up and the head, trained on cached inputs to that block, give the
    model that end-to-end fine-tuning of the same layers gives: same batches, flips and optimiser, the
    frozen layers below computed once instead of at every step (rounding only, as between the engines)."""
    backbone = build_backbone("none", TINY)
    first = next(i for i, layer in enumerate(backbone.layers) if layer.name.startswith("expanded_conv_10_"))
    common = dict(epochs=2, fine_tune_epochs=2, fine_tune_learning_rate=1e-3)
    cached = train(split_folders, tmp_path / "blocks", tiny_config(train_from="expanded_conv_10", **common),
                   cache_dir=cache_dir)
    end_to_end = train(split_folders, tmp_path / "images",
                       tiny_config(engine="keras", fine_tune_layers=len(backbone.layers) - first, **common),
                       cache_dir=cache_dir)
    assert cached.engine == "blocks" and len(cached.history["loss"]) == 4 and "fine_tuning" in cached.timings
    np.testing.assert_allclose(cached.history["loss"], end_to_end.history["loss"], atol=1e-4)
    np.testing.assert_allclose(cached.history["val_loss"], end_to_end.history["val_loss"], atol=1e-4)
    files = sorted(split_folders.rglob("*.png"))
    predictors = [KerasPredictor.load(r.run_dir, runtime="keras", cache_dir=cache_dir) for r in (cached, end_to_end)]
    np.testing.assert_allclose(*[p.predict_files(files).probabilities for p in predictors], atol=1e-4)

    keras.utils.set_random_seed(tiny_config().seed)  # as train() does before it builds the backbone: its starting weights
    start = build_backbone("none", TINY)
    moved = [layer.name for layer in predictors[0].backbone.layers if layer.get_weights() and any(
             not np.array_equal(a, b) for a, b in zip(layer.get_weights(), start.get_layer(layer.name).get_weights()))]
    learnable = [layer.name for layer in backbone.layers[first:]
                 if layer.get_weights() and not isinstance(layer, keras.layers.BatchNormalization)]
    assert moved == learnable and "conv_1" in moved and "expanded_conv_10_expand" in moved


@pytest.mark.parametrize("overrides, said", [
    (dict(train_from="expanded_conv_10"), "fine_tune_epochs > 0"),
    (dict(train_from="expanded_conv_10", fine_tune_epochs=1, engine="keras"), "engine auto or cached"),
])
def test_train_from_needs_fine_tuning_epochs_on_cached_inputs(overrides, said):
    with pytest.raises(ConfigError, match=said):
        tiny_config(**overrides)


def test_train_from_an_unknown_block_names_the_blocks(split_folders, tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"one of the backbone's blocks \['expanded_conv_1', .*'conv_1'\]"):
        train(split_folders, tmp_path / "run", tiny_config(train_from="block_99", fine_tune_epochs=1),
              cache_dir=cache_dir)


@pytest.mark.parametrize("architecture,dim", [("MobileNetV3Large", 960), ("EfficientNetV2B0", 1280), ("DenseNet121", 1024),
                                               ("DenseNet121-XRV", 1024)])
def test_other_backbones_train_on_cached_features(split_folders, tmp_path, cache_dir, architecture, dim):
    """Each backbone trains through the feature cache like the reference's: the saved model, run on
    the images end to end, gives the probabilities the run's predictor computes from cached features."""
    result = train(split_folders, tmp_path / "run", tiny_config(backbone=architecture, epochs=1), cache_dir=cache_dir)
    model = keras.models.load_model(result.run_dir / "model.keras", compile=False)
    assert model.get_layer("head").input_shape[-1] == dim
    assert architecture in json.loads((result.run_dir / "model.json").read_text())["architecture"]
    files = sorted(split_folders.rglob("*.png"))[:6]
    raw = KerasPredictor.load(result.run_dir, runtime="keras", cache_dir=cache_dir).predict_files(files).raw
    images = np.stack([read_image(f, TINY) for f in files]).astype(np.float32)
    np.testing.assert_allclose(raw, np.asarray(model(images)), atol=1e-5)


def test_a_backbone_weights_file_must_be_that_backbones(tmp_path):
    from lungxray.errors import WeightsError
    from lungxray.model.network import model_fingerprint

    large = build_backbone("none", TINY, architecture="MobileNetV3Large")
    large.save_weights(tmp_path / "large.weights.h5")
    assert model_fingerprint(build_backbone(str(tmp_path / "large.weights.h5"), TINY,
                                            architecture="MobileNetV3Large")) == model_fingerprint(large)
    with pytest.raises(WeightsError, match="large.weights.h5 is not a DenseNet121 \\(no top\\) weights file"):
        build_backbone(str(tmp_path / "large.weights.h5"), TINY, architecture="DenseNet121")
    with pytest.raises(ConfigError, match="train_from names one of MobileNetV3's blocks"):
        tiny_config(backbone="DenseNet121", train_from="conv_1", fine_tune_epochs=1)
