"""Networks: a torchvision body with fastai's head, its layer groups, and freezing.

fastai's ``cnn_learner`` (reference §2): cut the classifier off a torchvision
model, put ``AdaptiveConcatPool2d -> Flatten -> [BN, Dropout, Linear, ReLU]* ->
BN, Dropout, Linear`` on top, and split the result into layer groups so each
group can get its own learning rate.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv_models

from shared.errors import DataError, WeightsMissing
from shared.spec import Head

log = logging.getLogger(__name__)

# torch hub's file names for torchvision's ImageNet weights (the DEFAULT = V1 for
# resnet, which is what fastai v1 used).  Workers have no network: the file must
# already be in the weights folder.
WEIGHT_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
    "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
}


class AdaptiveConcatPool2d(nn.Module):
    """Max pool and average pool to 1x1, concatenated (max first, as fastai)."""

    def __init__(self) -> None:
        super().__init__()
        self.mp = nn.AdaptiveMaxPool2d(1)
        self.ap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


def _torchvision_model(arch: str) -> nn.Module:
    """An untrained torchvision model: weights are loaded separately from a file."""
    factory = getattr(tv_models, arch)
    model: nn.Module = factory(weights=None)
    return model


def create_body(arch: str) -> nn.Sequential:
    """The convolutional body: resnets keep everything before avgpool, mobilenets their features."""
    model = _torchvision_model(arch)
    if arch.startswith("resnet"):
        return nn.Sequential(*list(model.children())[:-2])
    if arch.startswith("mobilenet_v3"):
        features = model.features
        assert isinstance(features, nn.Sequential)
        return nn.Sequential(*features.children())
    raise DataError(f"model.arch: unknown architecture {arch!r}")


def body_features(body: nn.Module) -> int:
    """Output channels of a body, found by running a tiny input through it."""
    was_training = body.training
    body.eval()
    with torch.no_grad():
        out = body(torch.zeros(1, 3, 64, 64))
    body.train(was_training)
    return int(out.shape[1])


def _dropouts(head: Head) -> list[float]:
    """fastai: a scalar ps gives ps/2 to hidden blocks and ps to the last."""
    n_linear = len(head.lin_ftrs) + 1
    if isinstance(head.ps, list):
        return list(head.ps)
    return [head.ps / 2] * (n_linear - 1) + [head.ps]


def create_head(n_features: int, n_out: int, head: Head) -> nn.Sequential:
    """fastai's ``create_head``: pool, flatten, then BN-Dropout-Linear(-ReLU) blocks."""
    pool_features = n_features * 2 if head.concat_pool else n_features
    sizes = [pool_features, *head.lin_ftrs, n_out]
    layers: list[nn.Module] = [
        AdaptiveConcatPool2d() if head.concat_pool else nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    dropouts = _dropouts(head)
    for i, (n_in, n_out_i) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.BatchNorm1d(n_in))
        if dropouts[i] > 0:
            layers.append(nn.Dropout(dropouts[i]))
        layers.append(nn.Linear(n_in, n_out_i))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    if head.bn_final:
        layers.append(nn.BatchNorm1d(n_out, momentum=0.01))
    result = nn.Sequential(*layers)
    init_head(result)
    return result


def init_head(head: nn.Module) -> None:
    """Kaiming-normal weights (fan_in, gain sqrt 2) and zero bias for the head's Linears."""
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(arch: str, n_out: int, head: Head, *, weights: Path | None = None) -> nn.Sequential:
    """``nn.Sequential(body, head)``; ``weights`` is a torchvision ImageNet state dict file."""
    body = create_body(arch)
    if weights is not None:
        load_body_weights(body, arch, weights)
    return nn.Sequential(body, create_head(body_features(body), n_out, head))


def imagenet_weights_file(arch: str, weights_dir: Path) -> Path:
    """The weight file this arch needs; fail at once naming it when it is absent."""
    path = weights_dir / WEIGHT_FILES[arch]
    if not path.is_file():
        raise WeightsMissing(
            f"model.pretrained: imagenet weights for {arch} are not in the weights folder; "
            f"place torchvision's file {WEIGHT_FILES[arch]} at {path} (workers have no network), "
            "or set pretrained: none"
        )
    return path


def load_body_weights(body: nn.Sequential, arch: str, path: Path) -> None:
    """Load a torchvision state dict (``weights_only=True``) into a cut body."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    full = _torchvision_model(arch)
    missing, unexpected = full.load_state_dict(state, strict=False)
    if missing:
        raise WeightsMissing(
            f"model.pretrained: {path} does not fit {arch} (missing {missing[:3]})"
        )
    if unexpected:
        log.warning("ignoring %d unexpected keys in %s", len(unexpected), path)
    fresh = create_body_from(full, arch)
    body.load_state_dict(fresh.state_dict())


def create_body_from(model: nn.Module, arch: str) -> nn.Sequential:
    """Cut an already-built torchvision model the way :func:`create_body` does."""
    if arch.startswith("resnet"):
        return nn.Sequential(*list(model.children())[:-2])
    features = model.features
    assert isinstance(features, nn.Sequential)
    return nn.Sequential(*features.children())


def layer_groups(model: nn.Sequential, arch: str) -> list[list[nn.Module]]:
    """fastai's split: 3 groups, the last being the head.

    resnets split at layer3 (g0 = stem+layer1+layer2, g1 = layer3+layer4);
    mobilenet_v3 (not in fastai v1) splits its features in the middle.
    """
    body, head = model[0], model[1]
    children = list(body.children())
    cut = 6 if arch.startswith("resnet") else len(children) // 2
    return [children[:cut], children[cut:], [head]]


def _leaves(modules: Sequence[nn.Module]) -> Iterator[nn.Module]:
    for module in modules:
        for sub in module.modules():
            if not list(sub.children()):
                yield sub


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm of any dimension (fastai keeps these trainable when frozen)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def freeze_to(groups: Sequence[Sequence[nn.Module]], n: int, *, train_bn: bool = True) -> None:
    """Freeze groups [0, n) except their BatchNorms; make the rest trainable."""
    for index, group in enumerate(groups):
        for leaf in _leaves(group):
            trainable = index >= n or (train_bn and is_batchnorm(leaf))
            for param in leaf.parameters(recurse=False):
                param.requires_grad_(trainable)


def set_trainable(groups: Sequence[Sequence[nn.Module]], train: str) -> None:
    """``train: head`` = freeze every group but the last; ``all`` = unfreeze."""
    freeze_to(groups, len(groups) - 1 if train == "head" else 0)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those that will be trained)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def param_groups(groups: Sequence[Sequence[nn.Module]]) -> list[list[nn.Parameter]]:
    """Two optimizer groups per layer group: (weights) and (BatchNorm params + biases).

    Only trainable parameters go in, as fastai's optimizer only holds what was
    trainable when it was built.
    """
    result: list[list[nn.Parameter]] = []
    for group in groups:
        weights: list[nn.Parameter] = []
        no_wd: list[nn.Parameter] = []
        for leaf in _leaves(group):
            for name, param in leaf.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if is_batchnorm(leaf) or name == "bias":
                    no_wd.append(param)
                else:
                    weights.append(param)
        result.extend([weights, no_wd])
    return result
