"""`lungxray convert-backbone`: TorchXRayVision's DenseNet121, converted, computes the features that
torchxrayvision's own forward pass computes. Its pretrained files cannot be downloaded here, so the
parity runs on random weights, with random batch statistics (fresh ones, all 0 and 1, would hide a
statistic put in the wrong place)."""

import sys
import types

import numpy as np
import pytest
import torch  # make test installs it (the convert extra)

from lungxray.cli import main
from lungxray.convert.torchxrayvision import convert_checkpoint
from lungxray.data.images import read_image
from lungxray.errors import WeightsError
from lungxray.model.network import XRV_BACKBONE, build_backbone
from tests.conftest import CXR, require_shared, torchxrayvision_wheel


SIZE = 224


@pytest.fixture(scope="module")
def xrv():
    """torchxrayvision, imported from its wheel. PyPI's torchvision does not load beside the CPU build
    of torch these machines have; the package imports it at the top but its DenseNet never uses it,
    so empty modules stand in for it."""
    stand_ins = {name: types.ModuleType(name) for name in ("torchvision", "torchvision.models",
                                                           "torchvision.transforms")}
    for part in ("models", "transforms"):
        setattr(stand_ins["torchvision"], part, stand_ins[f"torchvision.{part}"])
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    sys.path.insert(0, str(torchxrayvision_wheel()))
    try:
        import torchxrayvision
        yield torchxrayvision
    finally:
        sys.path.remove(str(torchxrayvision_wheel()))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    """Eight real films, RGB in [0, 255] as lungxray reads them."""
    require_shared()
    paths = sorted((CXR / "test").rglob("*.jp*g"))[::300][:8]
    return np.stack([read_image(path, SIZE) for path in paths]).astype(np.float32)


@pytest.fixture(scope="module")
def model(xrv, films):
    """Random weights; batch statistics measured on four of the films (as training leaves them, so that
    activations keep the scale of a trained network's, not thousands)."""
    torch.manual_seed(0)
    network = xrv.models.DenseNet(weights=None)
    generator = np.random.default_rng(0)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data = torch.tensor(generator.uniform(0.5, 1.5, module.num_features), dtype=torch.float32)
            module.bias.data = torch.tensor(generator.normal(0, 0.1, module.num_features), dtype=torch.float32)
            module.momentum = None  # the running statistics become the batch's
    with torch.no_grad():
        network.train()(torch.from_numpy(xrv.datasets.normalize(films[:4, ..., 0], 255)[:, None]))
    return network.eval()


def test_converted_densenet_gives_torchxrayvisions_features(xrv, model, films, tmp_path, capsys):
    torch.save(model.state_dict(), tmp_path / "xrv.pt")
    out = tmp_path / "xrv.weights.h5"
    assert main(["convert-backbone", str(tmp_path / "xrv.pt"), "--out", str(out)]) == 0
    assert "--backbone DenseNet121-XRV" in capsys.readouterr().out
    backbone = build_backbone(str(out), SIZE, pooling="avg", architecture=XRV_BACKBONE)

    images = films[4:]  # not the films the statistics came from
    ours = np.asarray(backbone(images))
    grey = xrv.datasets.normalize(images[..., 0], 255)  # TorchXRayVision's own scaling to [-1024, 1024]
    with torch.no_grad():
        theirs = model.features2(torch.from_numpy(grey[:, None])).numpy()
    assert ours.shape == theirs.shape == (len(images), 1024)
    assert np.abs(theirs).max() > 0.1  # features, not a dead network
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_a_whole_pickled_model_needs_trust(model, tmp_path):
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(WeightsError, match="holds a pickled model, which runs code as it is read.*--trust-pickle"):
        convert_checkpoint(tmp_path / "whole.pt", tmp_path / "a.weights.h5")
    convert_checkpoint(tmp_path / "whole.pt", tmp_path / "a.weights.h5", trust_pickle=True)
    assert (tmp_path / "a.weights.h5").is_file()


def test_what_is_not_a_torchxrayvision_densenet_is_named(model, tmp_path, capsys):
    state = model.state_dict()
    three = dict(state, **{"features.conv0.weight": state["features.conv0.weight"].repeat(1, 3, 1, 1)})
    torch.save(three, tmp_path / "imagenet.pt")
    with pytest.raises(WeightsError, match="takes 3 channels.*--backbone DenseNet121 instead"):
        convert_checkpoint(tmp_path / "imagenet.pt", tmp_path / "x.weights.h5")
    torch.save({k: v for k, v in state.items() if "denselayer16" not in k}, tmp_path / "short.pt")
    with pytest.raises(WeightsError, match="has no features.denseblock3.denselayer16.norm1.weight"):
        convert_checkpoint(tmp_path / "short.pt", tmp_path / "x.weights.h5")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    assert main(["convert-backbone", str(tmp_path / "text.pt"), "--out", str(tmp_path / "x.weights.h5")]) == 2
    assert "text.pt: torch cannot read it as a checkpoint" in capsys.readouterr().err
    assert main(["convert-backbone", str(tmp_path / "text.pt"), "--out", str(tmp_path / "x.h5")]) == 2
    assert "must end with .weights.h5" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.weights.h5"))  # nothing half-written


def test_the_xrv_backbone_has_no_imagenet_weights():
    with pytest.raises(WeightsError, match="DenseNet121-XRV has no ImageNet weights.*convert-backbone"):
        build_backbone("imagenet", 32, architecture=XRV_BACKBONE)


def test_densenet121_files_of_the_two_kinds_are_not_swapped(model, tmp_path):
    """Both networks have the same layers, so Keras would load either file into either backbone and
    the features would be computed on the wrong input scale: the file says which backbone it is for."""
    torch.save(model.state_dict(), tmp_path / "xrv.pt")
    converted = convert_checkpoint(tmp_path / "xrv.pt", tmp_path / "xrv.weights.h5")
    with pytest.raises(WeightsError, match="xrv.weights.h5 holds DenseNet121-XRV weights: train with "
                                           "--backbone DenseNet121-XRV, not DenseNet121"):
        build_backbone(str(converted), 32, architecture="DenseNet121")
    build_backbone("none", 32, architecture="DenseNet121").save_weights(tmp_path / "imagenet.weights.h5")
    with pytest.raises(WeightsError, match="imagenet.weights.h5 is not a converted TorchXRayVision DenseNet121"):
        build_backbone(str(tmp_path / "imagenet.weights.h5"), 32, architecture=XRV_BACKBONE)
