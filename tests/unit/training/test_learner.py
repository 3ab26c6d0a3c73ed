"""The Learner: decoupled weight decay (oracle 14), per-group hyper-parameters, precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shared.spec import Head
from workers.training.learner import ADAM_BETAS, ADAM_EPS, Learner, Precision
from workers.training.models import create_head

CPU = torch.device("cpu")


def tiny_core(n_out: int = 3) -> nn.Sequential:
    """A small conv body (8 children, split 4/4 into two groups) with fastai's head."""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.BatchNorm2d(8),
    )
    return nn.Sequential(body, create_head(8, n_out, Head(lin_ftrs=[16])))


def _value(t: torch.Tensor) -> float:
    return float(t.detach())


def tiny_learner(*, multi_label: bool = False) -> Learner:
    return Learner(tiny_core(), "tiny", CPU, multi_label, Precision.choose("auto", CPU))


# --- oracle 14 -----------------------------------------------------------------------------


@pytest.mark.parametrize("train", ["all", "head"])
def test_oracle_14_zero_gradient_step_only_decays(train):
    learner = tiny_learner()
    learner.set_train(train, wd=1e-2)
    optimizer = learner.optimizer
    assert optimizer is not None
    assert len(optimizer.state) == 0
    learner.set_hyper([1e-3, 1e-3, 1e-3], 0.9)
    # Give BatchNorm weights/biases non-trivial values so (1 - 1e-5) is visible on them too.
    with torch.no_grad():
        for p in learner.core.parameters():
            p.copy_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in learner.core.named_parameters()}
    trainable = {n for n, p in learner.core.named_parameters() if p.requires_grad}
    assert any(".bias" in n for n in trainable)
    assert "0.1.weight" in trainable  # a body BatchNorm is trainable in both modes
    for p in learner.core.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in learner.core.named_parameters():
        if name in trainable:
            expected = before[name] * (1 - 1e-5)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)
            changed = p.detach() != before[name]
            assert bool(changed.any()), name
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_oracle_14_uses_each_groups_current_lr():
    learner = tiny_learner()
    learner.set_train("all", wd=1e-2)
    assert learner.optimizer is not None
    learner.set_hyper([1e-3, 1e-2, 1e-1], 0.9)
    body, head = learner.core[0], learner.core[1]
    with torch.no_grad():
        for p in learner.core.parameters():
            p.fill_(1.0)
    for p in learner.core.parameters():
        p.grad = torch.zeros_like(p)
    learner.optimizer.step()
    # group 0 = body children 0..3, group 1 = 4..7, group 2 = head.
    assert _value(body[0].weight[0, 0, 0, 0]) == pytest.approx(1 - 1e-5, rel=1e-6)
    assert _value(body[1].bias[0]) == pytest.approx(1 - 1e-5, rel=1e-6)
    assert _value(body[4].weight[0]) == pytest.approx(1 - 1e-4, rel=1e-6)
    assert _value(body[6].bias[0]) == pytest.approx(1 - 1e-4, rel=1e-6)
    assert _value(head[4].weight[0, 0]) == pytest.approx(1 - 1e-3, rel=1e-6)
    assert _value(head[2].weight[0]) == pytest.approx(1 - 1e-3, rel=1e-6)


def test_optimizer_is_adamw_with_fastai_settings():
    learner = tiny_learner()
    learner.set_train("all", wd=1e-2)
    optimizer = learner.optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert len(optimizer.param_groups) == 6
    for group in optimizer.param_groups:
        assert group["betas"] == ADAM_BETAS == (0.9, 0.99)
        assert group["eps"] == ADAM_EPS == 1e-8
        assert group["weight_decay"] == 1e-2
    assert learner.trainable_parameters() == sum(p.numel() for p in learner.core.parameters())


# --- set_hyper -----------------------------------------------------------------------------


def test_set_hyper_sets_both_torch_groups_of_each_layer_group_and_beta1():
    learner = tiny_learner()
    learner.set_train("all", wd=1e-2)
    assert learner.optimizer is not None
    learner.set_hyper([1e-5, 1e-4, 1e-3], 0.87)
    groups = learner.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-5, 1e-5, 1e-4, 1e-4, 1e-3, 1e-3]
    assert all(g["betas"] == (0.87, 0.99) for g in groups)
    learner.set_hyper([2e-3] * 3, 0.95)
    assert [g["lr"] for g in learner.optimizer.param_groups] == [2e-3] * 6
    assert all(g["betas"] == (0.95, 0.99) for g in learner.optimizer.param_groups)


def test_set_hyper_changes_the_adam_step():
    """beta1 set by set_hyper is the one Adam uses: the first step is lr·sign(g)."""
    learner = tiny_learner()
    learner.set_train("all", wd=0.0)
    assert learner.optimizer is not None
    learner.set_hyper([1e-2, 1e-2, 1e-2], 0.5)
    p = learner.core[1][4].weight
    before = p.detach().clone()
    for q in learner.core.parameters():
        q.grad = torch.ones_like(q)
    learner.optimizer.step()
    # With bias correction the first Adam step is lr * g / (|g| + eps) whatever beta1 is.
    torch.testing.assert_close(p.detach(), before - 1e-2, rtol=0, atol=1e-7)
    state = learner.optimizer.state[p]
    torch.testing.assert_close(state["exp_avg"], torch.full_like(p, 0.5))


# --- loss ----------------------------------------------------------------------------------


def test_loss_single_and_multi_label():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    single = tiny_learner()
    y = torch.tensor([0, 2])
    torch.testing.assert_close(single.loss(logits, y), nn.functional.cross_entropy(logits, y))
    torch.testing.assert_close(
        single.loss(logits, y, reduction="sum"),
        nn.functional.cross_entropy(logits, y, reduction="sum"),
    )
    multi = tiny_learner(multi_label=True)
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(multi.loss(logits, targets), bce.mean())
    # "sum" = Σ over items of the per-item mean over classes.
    torch.testing.assert_close(multi.loss(logits, targets, reduction="sum"), bce.mean(1).sum())


def test_evaluating_restores_train_mode():
    learner = tiny_learner()
    learner.core.train()
    with learner.evaluating():
        assert not learner.core.training
        assert not torch.is_grad_enabled()
    assert learner.core.training


# --- precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["auto", "fp16", "fp32"])
def test_precision_on_cpu_is_fp32(requested):
    precision = Precision.choose(requested, CPU)
    assert precision.name == "fp32"
    assert precision.dtype is None
    assert not precision.scaler.is_enabled()
    x = torch.ones(2, 2)
    with precision.autocast(CPU):
        assert (x @ x).dtype == torch.float32


def test_precision_bf16_on_cpu_autocasts():
    precision = Precision.choose("bf16", CPU)
    assert precision.name == "bf16"
    assert precision.dtype == torch.bfloat16
    assert not precision.scaler.is_enabled()
    x = torch.ones(2, 2)
    with precision.autocast(CPU):
        assert (x @ x).dtype == torch.bfloat16
