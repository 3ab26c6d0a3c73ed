"""Bodies, fastai heads, layer groups and freezing: reference oracles 6-9."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from shared.errors import WeightsMissing
from shared.spec import Head
from workers.training.learner import Learner, Precision
from workers.training.models import (
    WEIGHT_FILES,
    AdaptiveConcatPool2d,
    build_model,
    count_parameters,
    create_body,
    create_head,
    imagenet_weights_file,
    is_batchnorm,
    layer_groups,
    load_body_weights,
    param_groups,
    set_trainable,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def resnet34() -> nn.Sequential:
    torch.manual_seed(0)
    return build_model("resnet34", 3, Head())


@pytest.fixture(scope="module")
def mobilenet_small() -> nn.Sequential:
    return build_model("mobilenet_v3_small", 4, Head())


@pytest.fixture(scope="module")
def resnet18() -> nn.Sequential:
    torch.manual_seed(1)
    return build_model("resnet18", 5, Head())


def _learner(core: nn.Sequential, arch: str) -> Learner:
    return Learner(core, arch, CPU, False, Precision.choose("fp32", CPU))


def _expected_trainable_when_frozen(model: nn.Sequential) -> dict[str, bool]:
    """Head: everything; body: exactly the BatchNorm weights and biases."""
    expected: dict[str, bool] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            in_head = module_name.split(".")[0] == "1"
            expected[f"{module_name}.{param_name}"] = in_head or is_batchnorm(module)
    return expected


# --- oracle 6 ------------------------------------------------------------------------------


def test_oracle_6_resnet34_head_layers_in_order(resnet34):
    head = resnet34[1]
    kinds = [type(m) for m in head]
    assert kinds == [
        AdaptiveConcatPool2d,
        nn.Flatten,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.Linear,
        nn.ReLU,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.Linear,
    ]
    assert head[2].num_features == 1024
    assert head[3].p == 0.25
    assert (head[4].in_features, head[4].out_features) == (1024, 512)
    assert head[6].num_features == 512
    assert head[7].p == 0.5
    assert (head[8].in_features, head[8].out_features) == (512, 3)


def test_oracle_6_concat_pool_is_max_then_avg():
    pool = AdaptiveConcatPool2d()
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = pool(x)
    assert out.shape == (2, 6, 1, 1)
    assert torch.equal(out[:, :3, 0, 0], x.amax(dim=(2, 3)))
    assert torch.allclose(out[:, 3:, 0, 0], x.mean(dim=(2, 3)))


def test_oracle_6_resnet34_parameter_counts(resnet34):
    body, head = resnet34[0], resnet34[1]
    assert count_parameters(head) == 529_411
    body_bn = sum(
        p.numel() for m in body.modules() if is_batchnorm(m) for p in m.parameters(recurse=False)
    )
    assert body_bn == 17_024
    assert count_parameters(resnet34) == 21_814_083
    set_trainable(layer_groups(resnet34, "resnet34"), "head")
    assert count_parameters(resnet34, trainable_only=True) == 546_435


def test_oracle_6_frozen_output_shape(resnet34):
    resnet34.eval()
    with torch.no_grad():
        out = resnet34(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 3)


# --- oracle 7 ------------------------------------------------------------------------------


def test_oracle_7_resnet50_head_has_4096_features():
    model = build_model("resnet50", 2, Head())
    head = model[1]
    assert isinstance(head[2], nn.BatchNorm1d)
    assert head[2].num_features == 4096
    assert head[4].in_features == 4096


# --- oracle 8 ------------------------------------------------------------------------------


def test_oracle_8_three_groups_partitioning_the_resnet(resnet18):
    groups = layer_groups(resnet18, "resnet18")
    assert len(groups) == 3
    body = resnet18[0]
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert len(list(body.children())) == len(names)
    assert groups[0] == list(body.children())[:6]
    assert groups[1] == list(body.children())[6:]
    assert groups[2] == [resnet18[1]]
    assert isinstance(groups[0][0], nn.Conv2d)
    assert isinstance(groups[0][1], nn.BatchNorm2d)
    # Every parameter belongs to exactly one group.
    grouped = [id(p) for g in groups for m in g for p in m.parameters()]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in resnet18.parameters()}


def test_oracle_8_six_param_groups_and_new_optimizer_on_unfreeze(resnet18):
    learner = _learner(resnet18, "resnet18")
    assert learner.set_train("head", wd=1e-2) is True
    first = learner.optimizer
    assert first is not None
    assert len(first.param_groups) == 6
    # Populate Adam's state with one step.
    for group in first.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    first.step()
    assert len(first.state) > 0
    assert learner.set_train("head", wd=1e-2) is False
    assert learner.optimizer is first
    assert learner.set_train("all", wd=1e-2) is True
    second = learner.optimizer
    assert second is not first
    assert second is not None
    assert len(second.state) == 0
    assert len(second.param_groups) == 6
    # Unfrozen: the optimizer holds every parameter once.
    held = [id(p) for g in second.param_groups for p in g["params"]]
    assert len(held) == len(set(held))
    assert set(held) == {id(p) for p in resnet18.parameters()}
    # A new weight decay also rebuilds.
    assert learner.set_train("all", wd=0.0) is True
    assert learner.optimizer is not second
    for p in resnet18.parameters():
        p.grad = None


def test_param_groups_split_weights_from_bn_and_biases(resnet18):
    groups = layer_groups(resnet18, "resnet18")
    set_trainable(groups, "all")
    pgroups = param_groups(groups)
    assert len(pgroups) == 6
    names = {id(p): n for n, p in resnet18.named_parameters()}
    modules = dict(resnet18.named_modules())
    for index, params in enumerate(pgroups):
        for p in params:
            name = names[id(p)]
            owner = modules[name.rsplit(".", 1)[0]]
            no_wd = is_batchnorm(owner) or name.endswith(".bias")
            assert no_wd == (index % 2 == 1), name
    # Head group (b): 2 BatchNorm1d (weight, bias) + 2 Linear biases.
    assert len(pgroups[5]) == 6
    assert len(pgroups[4]) == 2
    # Frozen: group 0 and 1 hold no conv weights, only BatchNorm parameters.
    set_trainable(groups, "head")
    frozen = param_groups(groups)
    assert frozen[0] == []
    assert frozen[2] == []
    assert len(frozen[1]) > 0
    assert all(names[id(p)].split(".")[-1] in ("weight", "bias") for p in frozen[1])
    set_trainable(groups, "all")


# --- oracle 9 ------------------------------------------------------------------------------


def test_oracle_9_head_init(resnet34):
    head = resnet34[1]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    for linear in linears:
        assert torch.count_nonzero(linear.bias) == 0
    expected_std = math.sqrt(2 / 1024)
    assert expected_std == pytest.approx(0.0442, abs=1e-4)
    assert float(linears[0].weight.detach().std()) == pytest.approx(expected_std, rel=0.1)
    assert float(linears[1].weight.detach().std()) == pytest.approx(math.sqrt(2 / 512), rel=0.1)
    for bn in (m for m in head if isinstance(m, nn.BatchNorm1d)):
        assert torch.all(bn.weight == 1)
        assert torch.all(bn.bias == 0)


# --- freezing --------------------------------------------------------------------------------


def test_freezing_leaves_exactly_body_batchnorm_and_head_trainable(resnet34):
    set_trainable(layer_groups(resnet34, "resnet34"), "head")
    expected = _expected_trainable_when_frozen(resnet34)
    actual = {name: p.requires_grad for name, p in resnet34.named_parameters()}
    assert actual == expected
    assert any(not v for v in expected.values())
    assert actual["0.1.weight"] is True  # bn1
    assert actual["0.0.weight"] is False  # conv1
    assert actual["0.7.2.bn2.bias"] is True
    assert actual["0.7.2.conv2.weight"] is False
    assert actual["1.8.weight"] is True


def test_train_all_makes_everything_trainable(resnet34):
    groups = layer_groups(resnet34, "resnet34")
    set_trainable(groups, "head")
    set_trainable(groups, "all")
    assert all(p.requires_grad for p in resnet34.parameters())
    assert count_parameters(resnet34, trainable_only=True) == 21_814_083


def test_freezing_mobilenet_v3_small(mobilenet_small):
    model = mobilenet_small
    groups = layer_groups(model, "mobilenet_v3_small")
    assert len(groups) == 3
    set_trainable(groups, "head")
    expected = _expected_trainable_when_frozen(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == expected


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_mobilenet_v3_builds_with_three_groups(arch, request):
    if arch == "mobilenet_v3_small":
        model = request.getfixturevalue("mobilenet_small")
    else:
        model = build_model(arch, 4, Head())
    set_trainable(layer_groups(model, arch), "all")
    groups = layer_groups(model, arch)
    assert len(groups) == 3
    assert all(len(g) > 0 for g in groups)
    grouped = {id(p) for g in groups for m in g for p in m.parameters()}
    assert grouped == {id(p) for p in model.parameters()}
    assert len(param_groups(groups)) == 6
    nf = {"mobilenet_v3_small": 576, "mobilenet_v3_large": 960}[arch]
    assert model[1][2].num_features == 2 * nf
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


# --- head variations ---------------------------------------------------------------------


def _dropouts(head: nn.Sequential) -> list[float]:
    return [m.p for m in head if isinstance(m, nn.Dropout)]


def test_head_lin_ftrs_and_scalar_ps():
    head = create_head(512, 7, Head(lin_ftrs=[256, 128], ps=0.4))
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 256), (256, 128), (128, 7)]
    assert _dropouts(head) == pytest.approx([0.2, 0.2, 0.4])
    assert sum(isinstance(m, nn.ReLU) for m in head) == 2
    assert [m.num_features for m in head if isinstance(m, nn.BatchNorm1d)] == [1024, 256, 128]


def test_head_ps_list_one_per_linear():
    head = create_head(512, 2, Head(lin_ftrs=[64], ps=[0.1, 0.3]))
    assert _dropouts(head) == pytest.approx([0.1, 0.3])
    kinds = [type(m) for m in head]
    assert kinds.index(nn.Dropout) == 3


def test_head_ps_zero_omits_dropout():
    head = create_head(512, 2, Head(ps=0.0))
    assert not any(isinstance(m, nn.Dropout) for m in head)
    assert [type(m) for m in head][2:] == [
        nn.BatchNorm1d,
        nn.Linear,
        nn.ReLU,
        nn.BatchNorm1d,
        nn.Linear,
    ]
    mixed = create_head(512, 2, Head(ps=[0.0, 0.5]))
    assert _dropouts(mixed) == [0.5]


def test_head_without_concat_pool_halves_features():
    head = create_head(512, 3, Head(concat_pool=False))
    assert isinstance(head[0], nn.AdaptiveAvgPool2d)
    assert head[2].num_features == 512
    assert head[4].in_features == 512
    x = torch.randn(2, 512, 2, 2)
    head.eval()
    assert head(x).shape == (2, 3)


def test_head_bn_final():
    head = create_head(512, 3, Head(bn_final=True))
    last = head[-1]
    assert isinstance(last, nn.BatchNorm1d)
    assert last.num_features == 3
    assert last.momentum == 0.01


def test_head_no_hidden_layers():
    head = create_head(512, 3, Head(lin_ftrs=[], ps=0.5))
    assert [type(m) for m in head] == [
        AdaptiveConcatPool2d,
        nn.Flatten,
        nn.BatchNorm1d,
        nn.Dropout,
        nn.Linear,
    ]
    assert _dropouts(head) == [0.5]


# --- weights -------------------------------------------------------------------------------


def test_imagenet_weights_file_missing_names_file_and_folder(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(WeightsMissing) as info:
        imagenet_weights_file("resnet34", folder)
    message = str(info.value)
    assert "resnet34-b627a593.pth" in message
    assert str(folder) in message


def test_imagenet_weights_file_present(tmp_path):
    path = tmp_path / WEIGHT_FILES["resnet18"]
    path.write_bytes(b"x")
    assert imagenet_weights_file("resnet18", tmp_path) == path
    assert WEIGHT_FILES["resnet18"] == "resnet18-f37072fd.pth"


RESNET_CHILDREN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def test_load_body_weights_from_a_torchvision_state_dict(tmp_path: Path):
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    # Distinct running statistics so those are checked too.
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    state = reference.state_dict()
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(state, path)
    torch.manual_seed(3)
    model = build_model("resnet18", 3, Head(), weights=path)
    body_state = model[0].state_dict()
    assert len(body_state) == sum(1 for k in state if not k.startswith("fc."))
    for key, value in body_state.items():
        index, rest = key.split(".", 1)
        source = f"{RESNET_CHILDREN[int(index)]}.{rest}"
        assert torch.equal(value, state[source]), key


def test_load_body_weights_missing_keys_is_refused(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    body = create_body("resnet18")
    with pytest.raises(WeightsMissing, match="does not fit resnet18"):
        load_body_weights(body, "resnet18", path)
