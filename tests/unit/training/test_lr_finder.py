"""The LR finder: reference oracles 15-17 and the exact restore of the learner."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from shared.spec import Head, LrFind
from workers.training.learner import Learner, Precision
from workers.training.lr_finder import clone_state, lr_find
from workers.training.models import create_head
from workers.training.schedule import lr_find_lr, suggest_lr, suggest_minimum

CPU = torch.device("cpu")

Batch = tuple[torch.Tensor, torch.Tensor]


def tiny_learner(seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    )
    core = nn.Sequential(body, create_head(8, 3, Head(lin_ftrs=[16])))
    learner = Learner(core, "tiny", CPU, False, Precision.choose("auto", CPU))
    learner.set_train("all", wd=1e-2)
    return learner


def make_batches(n: int, *, seed: int = 0, bs: int = 8) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(bs, 3, 8, 8, generator=gen), torch.randint(0, 3, (bs,), generator=gen))
        for _ in range(n)
    ]


def warm_up(learner: Learner, batch: Batch) -> None:
    """One real training step so Adam's moments and BN statistics are non-trivial."""
    assert learner.optimizer is not None
    learner.core.train()
    learner.set_hyper([1e-3, 2e-3, 3e-3], 0.9)
    loss = learner.loss(learner.forward(batch[0]), batch[1])
    loss.backward()
    learner.optimizer.step()
    learner.optimizer.zero_grad(set_to_none=True)


def flatten_state(value: object, prefix: str = "") -> dict[str, object]:
    """Every leaf of a (nested) optimizer state dict, keyed by its path."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out.update(flatten_state(item, f"{prefix}/{key}"))
        return out
    if isinstance(value, list | tuple):
        out = {}
        for index, item in enumerate(value):
            out.update(flatten_state(item, f"{prefix}/{index}"))
        return out
    return {prefix: value}


def assert_same_state(before: dict[str, object], after: dict[str, object]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor), key
            assert torch.equal(value, other), key
        else:
            assert value == other, key


# --- oracles 15 and 16 ---------------------------------------------------------------------


def test_records_num_it_points_over_several_epochs_with_lr_find_lrs():
    learner = tiny_learner()
    batches = make_batches(3)
    epochs: list[int] = []

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        epochs.append(epoch)
        return iter(batches)

    params = LrFind(start_lr=1e-5, end_lr=1e-2, num_it=7, stop_div=False)
    result = lr_find(learner, epoch_batches, params, stage="s1")
    assert epochs == [0, 1, 2]
    assert len(result.lrs) == len(result.losses) == 7
    for i, lr in enumerate(result.lrs):
        assert lr == pytest.approx(lr_find_lr(i, start_lr=1e-5, end_lr=1e-2, num_it=7), rel=1e-12)
    assert result.lrs[0] == pytest.approx(1e-5, rel=1e-12)
    assert all(math.isfinite(v) for v in result.losses)
    assert result.stopped_early is False
    assert result.stage == "s1"
    assert result.suggest_method == "steep"
    assert result.suggestion == suggest_lr("steep", result.lrs, result.losses)
    assert result.min_loss_lr_div10 == suggest_minimum(result.lrs, result.losses)


def test_oracle_15_default_sweep_lrs():
    learner = tiny_learner()
    batches = make_batches(25, bs=4)
    result = lr_find(learner, lambda epoch: iter(batches), LrFind(stop_div=False), stage="s")
    assert len(result.lrs) == 100
    assert result.lrs[0] == pytest.approx(1e-7, rel=1e-6)
    assert result.lrs[1] == pytest.approx(1.2022644e-7, rel=1e-6)
    assert result.lrs[25] == pytest.approx(1e-5, rel=1e-6)
    assert result.lrs[50] == pytest.approx(1e-3, rel=1e-6)
    assert result.lrs[75] == pytest.approx(0.1, rel=1e-6)
    assert result.lrs[99] == pytest.approx(8.3176377, rel=1e-6)


def test_recorded_losses_are_smoothed():
    """Constant-loss batches (a model that ignores its input) record the raw loss."""
    learner = tiny_learner()
    with torch.no_grad():
        head = learner.core[1]
        head[-1].weight.zero_()
        head[-1].bias.zero_()
    # lr tiny, so the zero last layer barely moves: loss stays ln(3).
    params = LrFind(start_lr=1e-12, end_lr=1e-11, num_it=6, stop_div=False)
    result = lr_find(learner, lambda epoch: iter(make_batches(6)), params, stage="s")
    assert result.losses == [pytest.approx(math.log(3), rel=1e-5)] * 6


def test_oracle_16_weights_and_optimizer_state_restored():
    learner = tiny_learner()
    batches = make_batches(4)
    warm_up(learner, batches[0])
    optimizer = learner.optimizer
    assert optimizer is not None
    assert len(optimizer.state) > 0
    exp_avg = [s["exp_avg"] for s in optimizer.state.values()]
    assert any(bool(t.abs().sum() > 0) for t in exp_avg)
    model_before = clone_state(learner.core)
    assert any("running_mean" in k for k in model_before)
    assert any("num_batches_tracked" in k for k in model_before)
    opt_before = flatten_state(copy.deepcopy(optimizer.state_dict()))
    probe = learner.core[1][-1].weight
    seen_during: list[torch.Tensor] = []

    def epoch_batches(epoch: int) -> Iterator[Batch]:
        for batch in batches:
            yield batch
            seen_during.append(probe.detach().clone())

    params = LrFind(start_lr=1e-4, end_lr=1.0, num_it=10, stop_div=False)
    result = lr_find(learner, epoch_batches, params, stage="s")
    assert len(result.lrs) == 10
    # The sweep really trained the model...
    assert any(not torch.equal(w, model_before["1.8.weight"]) for w in seen_during)
    # ...and everything is back, bit for bit.
    assert learner.optimizer is optimizer
    assert_same_state(dict(model_before), dict(learner.core.state_dict()))
    assert_same_state(opt_before, flatten_state(optimizer.state_dict()))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3, 2e-3, 2e-3, 3e-3, 3e-3]
    assert all(g["betas"] == (0.9, 0.99) for g in optimizer.param_groups)
    # The optimizer still drives the model's own parameters, with no stale gradients.
    params_ids = {id(p) for p in learner.core.parameters()}
    assert {id(p) for p in optimizer.state} <= params_ids
    assert all(p.grad is None for p in learner.core.parameters())


def test_oracle_16_fresh_optimizer_stays_empty():
    learner = tiny_learner()
    optimizer = learner.optimizer
    assert optimizer is not None
    assert len(optimizer.state) == 0
    before = clone_state(learner.core)
    lr_find(learner, lambda epoch: iter(make_batches(3)), LrFind(num_it=6), stage="s")
    assert len(optimizer.state) == 0
    assert_same_state(dict(before), dict(learner.core.state_dict()))


# --- oracle 17 -----------------------------------------------------------------------------


def test_oracle_17_divergence_stops_after_the_point_that_exceeded_four_times_best():
    learner = tiny_learner()
    batches = make_batches(5)
    before = clone_state(learner.core)
    params = LrFind(start_lr=1e-3, end_lr=1e4, num_it=30)
    result = lr_find(learner, lambda epoch: iter(batches), params, stage="s")
    losses = result.losses
    assert result.stopped_early is True
    assert 2 <= len(losses) < 30
    assert all(math.isfinite(v) for v in losses)
    # The last recorded point is the one that exceeded 4x the best so far...
    assert losses[-1] > 4 * min(losses[:-1])
    # ...and no earlier point did.
    for i in range(1, len(losses) - 1):
        assert losses[i] <= 4 * min(losses[: i + 1]), i
    assert_same_state(dict(before), dict(learner.core.state_dict()))


def test_without_stop_div_the_sweep_runs_on():
    learner = tiny_learner()
    batches = make_batches(5)
    params = LrFind(start_lr=1e-3, end_lr=1e4, num_it=30)
    diverged = lr_find(learner, lambda epoch: iter(batches), params, stage="s")
    params_no_stop = LrFind(start_lr=1e-3, end_lr=1e4, num_it=30, stop_div=False)
    learner = tiny_learner()
    full = lr_find(learner, lambda epoch: iter(batches), params_no_stop, stage="s")
    assert diverged.stopped_early is True
    assert full.stopped_early is False
    assert len(full.lrs) == 30 > len(diverged.lrs)
    # Identical up to where the first run stopped (same data, same start).
    n = len(diverged.losses)
    assert full.losses[:n] == pytest.approx(diverged.losses, rel=1e-6)


def test_non_finite_loss_stops_without_recording_it():
    learner = tiny_learner()
    batches = make_batches(6)
    bad_x = batches[3][0].clone()
    bad_x[0, 0, 0, 0] = math.nan
    batches[3] = (bad_x, batches[3][1])
    before = clone_state(learner.core)
    params = LrFind(start_lr=1e-6, end_lr=1e-5, num_it=6, stop_div=False)
    result = lr_find(learner, lambda epoch: iter(batches), params, stage="s")
    assert result.stopped_early is True
    assert len(result.lrs) == len(result.losses) == 3
    assert all(math.isfinite(v) for v in result.losses)
    assert_same_state(dict(before), dict(learner.core.state_dict()))


def test_should_stop_ends_the_sweep():
    learner = tiny_learner()
    calls = iter(range(100))
    result = lr_find(
        learner,
        lambda epoch: iter(make_batches(8)),
        LrFind(num_it=8),
        stage="s",
        should_stop=lambda: next(calls) >= 2,
    )
    assert result.stopped_early is True
    assert len(result.lrs) == 3


def test_no_batches_records_nothing():
    learner = tiny_learner()
    result = lr_find(learner, lambda epoch: iter([]), LrFind(num_it=6), stage="s")
    assert result.lrs == []
    assert result.losses == []
    assert result.suggestion is None
    assert result.min_loss_lr_div10 is None
