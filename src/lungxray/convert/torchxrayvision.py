"""TorchXRayVision's DenseNet121 (trained on NIH, CheXpert, MIMIC-CXR, PadChest... films) as the
`DenseNet121-XRV` backbone: `lungxray convert-backbone CHECKPOINT --out FILE.weights.h5`, then
`train --backbone DenseNet121-XRV --weights FILE.weights.h5`.

torch reads the checkpoint (the `convert` extra); torchxrayvision is needed only to unpickle a whole
saved model, such as its own release files. The network is Keras' DenseNet121 layer for layer; its
pathology classifier is left out, as every backbone here comes without its top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lungxray.errors import WeightsError
from lungxray.io import atomic_path
from lungxray.model.network import XRV_BACKBONE, build_backbone, mark_backbone

DENSE_BLOCKS = (6, 12, 24, 16)  # DenseNet121's layers per dense block
INPUT_SIZE = 224  # the size TorchXRayVision's DenseNet121 weights were trained at


def convert_checkpoint(checkpoint: str | Path, out: str | Path, trust_pickle: bool = False) -> Path:
    """Write `checkpoint`'s DenseNet121 weights as a Keras weights file of the DenseNet121-XRV backbone."""
    out = Path(out)
    if not out.name.endswith(".weights.h5"):
        raise WeightsError(f"--out {out}: a Keras weights file's name must end with .weights.h5")
    state = read_checkpoint(checkpoint, trust_pickle)
    backbone = build_backbone("none", INPUT_SIZE, architecture=XRV_BACKBONE)
    layers = keras_layer_weights(state, checkpoint)
    unset = [layer.name for layer in backbone.layers if layer.weights and layer.name not in layers]
    if unset:  # every layer with weights must come from the checkpoint, or the file would mix in random ones
        raise WeightsError(f"{checkpoint}: nothing in it for the layers {unset}")
    for name, weights in layers.items():
        layer = backbone.get_layer(name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [w.shape for w in weights] != expected:
            raise WeightsError(f"{checkpoint}: {name} has shapes {[w.shape for w in weights]}, DenseNet121's are "
                               f"{expected}: not a DenseNet121 checkpoint")
        layer.set_weights(weights)
    with atomic_path(out) as temporary:
        backbone.save_weights(temporary)
        mark_backbone(temporary, XRV_BACKBONE)
    return out


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch checkpoint: a state dict (`torch.save(model.state_dict())`), one under
    "state_dict", or with `trust_pickle` a whole pickled model."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:
        if not trust_pickle and "Unsupported global" in str(error):  # a class, not only tensors
            raise WeightsError(
                f"{path} holds a pickled model, which runs code as it is read. If you trust where it comes "
                "from (TorchXRayVision's release files are such), pass --trust-pickle; with torchxrayvision "
                "installed, its classes then load") from None
        raise WeightsError(f"{path}: torch cannot read it as a checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(loaded, torch.nn.Module):
        loaded = loaded.state_dict()
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a model or a state dict")
    # DataParallel saves its module's names under "module."
    return {name.removeprefix("module."): tensor.detach().cpu().numpy() for name, tensor in loaded.items()
            if torch.is_tensor(tensor)}


def keras_layer_weights(state: dict[str, np.ndarray], checkpoint) -> dict[str, list[np.ndarray]]:
    """Keras DenseNet121's layer weights by layer name, from torchvision's (and TorchXRayVision's) names."""
    def tensor(name: str) -> np.ndarray:
        if name not in state:
            raise WeightsError(f"{checkpoint} has no {name}: not a DenseNet121 checkpoint")
        return state[name]

    def kernel(name: str) -> list[np.ndarray]:  # (out, in, h, w) -> (h, w, in, out)
        return [tensor(name).transpose(2, 3, 1, 0)]

    def batch_norm(name: str) -> list[np.ndarray]:
        return [tensor(f"{name}.{part}") for part in ("weight", "bias", "running_mean", "running_var")]

    first = tensor("features.conv0.weight")
    if first.shape[1] != 1:
        raise WeightsError(f"{checkpoint}: its first convolution takes {first.shape[1]} channels, TorchXRayVision's "
                           "one (a grey film): an ImageNet DenseNet121 is --backbone DenseNet121 instead")
    # A grey film reaches the backbone as three equal channels: a third of the kernel on each is
    # TorchXRayVision's one-channel convolution (and a colour image counts as the mean of its channels).
    layers = {"conv1_conv": [np.repeat(kernel("features.conv0.weight")[0], 3, axis=2) / 3],
              "conv1_bn": batch_norm("features.norm0"), "bn": batch_norm("features.norm5")}
    for block, size in enumerate(DENSE_BLOCKS, start=1):
        for index in range(1, size + 1):
            theirs, ours = f"features.denseblock{block}.denselayer{index}", f"conv{block + 1}_block{index}"
            layers[f"{ours}_0_bn"] = batch_norm(f"{theirs}.norm1")
            layers[f"{ours}_1_conv"] = kernel(f"{theirs}.conv1.weight")
            layers[f"{ours}_1_bn"] = batch_norm(f"{theirs}.norm2")
            layers[f"{ours}_2_conv"] = kernel(f"{theirs}.conv2.weight")
        if block < len(DENSE_BLOCKS):
            layers[f"pool{block + 1}_bn"] = batch_norm(f"features.transition{block}.norm")
            layers[f"pool{block + 1}_conv"] = kernel(f"features.transition{block}.conv.weight")
    return layers
