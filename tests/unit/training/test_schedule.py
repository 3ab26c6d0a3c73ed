"""Schedules and lr suggestions: reference oracles 10-13, 15, 18, 19 and edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from workers.training.schedule import (
    Smoother,
    cos_anneal,
    lr_find_lr,
    lr_range,
    one_cycle_lr,
    one_cycle_momentum,
    one_cycle_phase_lengths,
    smooth,
    suggest_lr,
    suggest_minimum,
    suggest_steep,
    suggest_valley,
)

RTOL = 1e-6


def approx(value: float) -> object:
    return pytest.approx(value, rel=RTOL, abs=0)


# --- oracle 10: lr_range ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_lr", "expected"),
    [
        ([1e-5, 1e-3], [1e-5, 1e-4, 1e-3]),
        ([3e-5, 3e-4], [3e-5, 9.486833e-5, 3e-4]),
        ([3e-3], [3e-4, 3e-4, 3e-3]),
        (None, [3e-4, 3e-4, 3e-3]),
    ],
)
def test_oracle_10_lr_range_slices(max_lr, expected):
    result = lr_range(max_lr, 3)
    assert len(result) == 3
    assert result == [approx(v) for v in expected]


@pytest.mark.parametrize("value", [1e-2, 3e-3, 1])
def test_lr_range_number_is_the_same_for_every_group(value):
    assert lr_range(value, 3) == [float(value)] * 3
    assert lr_range(value, 1) == [float(value)]


def test_lr_range_single_group_slices():
    assert lr_range([1e-5, 1e-3], 1) == [1e-3]
    assert lr_range([3e-3], 1) == [3e-3]


def test_lr_range_explicit_list_per_group():
    assert lr_range([1e-4, 2e-4, 3e-4], 3) == [1e-4, 2e-4, 3e-4]
    with pytest.raises(ValueError, match="3 learning rates for 4 layer groups"):
        lr_range([1e-4, 2e-4, 3e-4], 4)


# --- oracles 11 and 12: one-cycle, N=40, max_lr=3e-3 ------------------------------------------


def test_phase_lengths():
    assert one_cycle_phase_lengths(40, 0.3) == (12, 28)
    assert one_cycle_phase_lengths(100, 0.3) == (30, 70)
    assert one_cycle_phase_lengths(3, 0.3) == (0, 3)


@pytest.mark.parametrize(
    ("batch", "lr", "mom"),
    [
        (0, 1.2e-4, 0.95),
        (1, 1.690668e-4, 0.948296),
        (6, 1.56e-3, 0.90),
        (12, 3e-3, 0.85),
        (13, 2.990568e-3, 0.850314),
        (26, 1.500006e-3, 0.90),
        (39, 9.443647e-6, 0.949686),
    ],
)
def test_oracle_11_one_cycle_n40(batch, lr, mom):
    assert one_cycle_lr(batch, 40, 3e-3) == approx(lr)
    assert one_cycle_momentum(batch, 40) == approx(mom)


def test_oracle_12_max_lr_only_at_batch_12():
    lrs = [one_cycle_lr(t, 40, 3e-3) for t in range(40)]
    assert int(np.argmax(lrs)) == 12
    assert lrs[12] == approx(3e-3)
    others = lrs[:12] + lrs[13:]
    assert all(v < 3e-3 * (1 - 1e-4) for v in others)
    # Warm-up rises monotonically, annealing falls monotonically.
    assert all(a < b for a, b in itertools.pairwise(lrs[:13]))
    assert all(a > b for a, b in itertools.pairwise(lrs[12:]))
    # The momentum is lowest exactly where the lr is highest.
    moms = [one_cycle_momentum(t, 40) for t in range(40)]
    assert int(np.argmin(moms)) == 12


def test_oracle_12_lr_left_after_the_call():
    # The scheduler steps once more after the last batch: p = 1 of the annealing phase.
    assert one_cycle_lr(40, 40, 3e-3) == approx(3e-3 / (25 * 1e4))
    assert one_cycle_lr(40, 40, 3e-3) == approx(1.2e-8)
    assert one_cycle_momentum(40, 40) == approx(0.95)


def test_one_cycle_final_div_and_div_factor():
    assert one_cycle_lr(0, 40, 1e-2, div_factor=10) == approx(1e-3)
    assert one_cycle_lr(40, 40, 1e-2, final_div=100) == approx(1e-4)
    assert one_cycle_lr(40, 40, 1e-2, div_factor=10) == approx(1e-2 / 1e5)
    # pct_start moves the peak.
    assert one_cycle_lr(20, 40, 1e-2, pct_start=0.5) == approx(1e-2)
    assert one_cycle_momentum(20, 40, pct_start=0.5, moms=(0.9, 0.8)) == approx(0.8)


# --- oracle 13: one-cycle, N=100, max_lr=1e-2 -------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "lr"),
    [(0, 4e-4), (15, 5.2e-3), (30, 1e-2), (65, 5.00002e-3), (99, 5.074647e-6)],
)
def test_oracle_13_one_cycle_n100(batch, lr):
    assert one_cycle_lr(batch, 100, 1e-2) == approx(lr)


def test_cos_anneal_endpoints():
    assert cos_anneal(1.0, 0.0, 0.0) == 1.0
    assert cos_anneal(1.0, 0.0, 1.0) == 0.0
    assert cos_anneal(2.0, 4.0, 0.5) == approx(3.0)


@pytest.mark.parametrize("total", [1, 2, 3])
def test_small_totals_do_not_divide_by_zero(total):
    # int(total * 0.3) == 0: no warm-up phase at all.
    assert one_cycle_phase_lengths(total, 0.3)[0] == 0
    for step in range(total + 1):
        lr = one_cycle_lr(step, total, 1e-2)
        mom = one_cycle_momentum(step, total)
        assert math.isfinite(lr)
        assert 1e-2 / 2.5e5 * (1 - 1e-9) <= lr <= 1e-2
        assert 0.85 <= mom <= 0.95
    # Without warm-up the first batch starts at the top of the annealing phase.
    assert one_cycle_lr(0, total, 1e-2) == approx(1e-2)
    assert one_cycle_lr(total, total, 1e-2) == approx(1e-2 / 2.5e5)


def test_zero_total_is_finite():
    assert math.isfinite(one_cycle_lr(0, 0, 1e-2))
    assert math.isfinite(one_cycle_momentum(0, 0))


# --- oracle 15: the LR finder's sweep ---------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "lr"),
    [(0, 1e-7), (1, 1.2022644e-7), (25, 1e-5), (50, 1e-3), (75, 0.1), (99, 8.3176377)],
)
def test_oracle_15_lr_find_lr(batch, lr):
    assert lr_find_lr(batch, start_lr=1e-7, end_lr=10, num_it=100) == approx(lr)


def test_lr_find_lr_reaches_end_only_at_num_it():
    assert lr_find_lr(100, start_lr=1e-7, end_lr=10, num_it=100) == approx(10.0)
    assert lr_find_lr(99, start_lr=1e-7, end_lr=10, num_it=100) < 10
    assert lr_find_lr(5, start_lr=1e-3, end_lr=1.0, num_it=10) == approx(1e-3 * 1000**0.5)


# --- oracle 18: the smoother ------------------------------------------------------------------


def test_oracle_18_smoother_values():
    assert smooth([1.0, 2.0, 3.0]) == [approx(1.0), approx(1.505051), approx(2.013468)]


@pytest.mark.parametrize("c", [0.5, 2.3, 7.0])
def test_oracle_18_constant_input_is_constant_from_the_first_step(c):
    assert smooth([c] * 20) == [approx(c)] * 20


def test_smoother_state_roundtrip_continues_identically():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    whole = smooth(values)
    first = Smoother()
    for v in values[:3]:
        first.add(v)
    resumed = Smoother.from_state(first.state())
    rest = [resumed.add(v) for v in values[3:]]
    assert rest == whole[3:]
    assert math.isnan(Smoother().value)


# --- oracle 19 and the other suggestion rules -------------------------------------------------

ORACLE_19 = [3.0, 2.9, 2.5, 1.8, 1.2, 1.0, 1.1, 2.0, 5.0]


def _lrs(n: int) -> list[float]:
    return [1e-6 * 10 ** (i / 4) for i in range(n)]


def test_oracle_19_gradient_matches_numpy():
    grads = np.gradient(np.array(ORACLE_19))
    assert grads.tolist() == pytest.approx([-0.1, -0.25, -0.55, -0.65, -0.4, -0.05, 0.5, 1.95, 3.0])
    assert int(np.argmin(grads)) == 3


def test_oracle_19_steep_without_trimming():
    lrs = _lrs(len(ORACLE_19))
    assert suggest_steep(lrs, ORACLE_19, skip_start=0, skip_end=0) == lrs[3]


def test_oracle_19_steep_after_default_trimming():
    # 10 noisy points before and 5 after are trimmed away by skip_start=10, skip_end=5.
    losses = [0.1, 9.0] * 5 + ORACLE_19 + [0.0, 50.0, 0.0, 50.0, 0.0]
    lrs = _lrs(len(losses))
    assert suggest_steep(lrs, losses) == lrs[10 + 3]
    assert suggest_lr("steep", lrs, losses) == lrs[13]


def test_suggest_minimum_is_the_lr_at_the_minimum_over_ten():
    lrs = _lrs(len(ORACLE_19))
    assert suggest_minimum(lrs, ORACLE_19) == approx(lrs[5] / 10)
    assert suggest_lr("minimum", lrs, ORACLE_19) == approx(lrs[5] / 10)
    assert suggest_minimum([], []) is None


def test_suggest_valley_on_a_strictly_falling_then_rising_curve():
    # The longest decreasing run is indices 0..9 (length 10); fastai 2's arithmetic:
    # start = end - length = -1, idx = -1 + int(10/3) + int(10/6) = 3.
    losses = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 2.0, 3.0, 4.0]
    lrs = _lrs(len(losses))
    assert suggest_valley(lrs, losses, skip_start=0, skip_end=0) == lrs[3]


def test_suggest_valley_run_after_a_low_first_point():
    # index 0 is below everything; the longest decreasing run is 5,4,3,2,1.5 (indices 1..5).
    # end = 5, length = 5: idx = 5 - 5 + int(5/3) + int(5/6) = 1.
    losses = [1.0, 5.0, 4.0, 3.0, 2.0, 1.5, 9.0, 8.0]
    lrs = _lrs(len(losses))
    assert suggest_valley(lrs, losses, skip_start=0, skip_end=0) == lrs[1]
    # The same curve behind 10 leading and 5 trailing points that default trimming drops.
    padded = [*([0.5] * 10), *losses, *([0.0] * 5)]
    all_lrs = _lrs(len(padded))
    assert suggest_lr("valley", all_lrs, padded) == all_lrs[10 + 1]


def test_suggest_valley_with_noise_in_the_run():
    # Longest decreasing subsequence (not contiguous): 9, 8, 7, 6, 5, 4 ends at index 7
    # (length 6); idx = 7 - 6 + 2 + 1 = 4.
    losses = [9.0, 8.0, 8.5, 7.0, 6.0, 6.5, 5.0, 4.0, 7.0]
    lrs = _lrs(len(losses))
    assert suggest_valley(lrs, losses, skip_start=0, skip_end=0) == lrs[4]


def test_suggestions_ignore_points_after_the_first_non_finite_loss():
    lrs = _lrs(12)
    # A finite curve, then a NaN, then points that would otherwise win every rule.
    losses = [3.0, 2.9, 2.5, 1.8, 1.2, 1.0, 1.1, 2.0, math.nan, -100.0, -1000.0, -5000.0]
    assert suggest_steep(lrs, losses, skip_start=0, skip_end=0) == lrs[3]
    assert suggest_minimum(lrs, losses) == approx(lrs[5] / 10)
    # Finite prefix: run 3.0 .. 1.0 (indices 0..5, length 6): idx = 5 - 6 + 2 + 1 = 2.
    assert suggest_valley(lrs, losses, skip_start=0, skip_end=0) == lrs[2]
    with_inf = [*losses[:8], math.inf, -1e9]
    assert suggest_steep(lrs[:10], with_inf, skip_start=0, skip_end=0) == lrs[3]
    assert suggest_minimum(lrs[:10], with_inf) == approx(lrs[5] / 10)


def test_suggestions_with_nothing_finite():
    lrs = _lrs(3)
    losses = [math.nan, 1.0, 0.5]
    assert suggest_steep(lrs, losses) is None
    assert suggest_minimum(lrs, losses) is None
    assert suggest_valley(lrs, losses) is None


def test_short_curves_fall_back_to_untrimmed():
    # 9 points cannot lose 15 to trimming: the rule runs on all of them.
    lrs = _lrs(len(ORACLE_19))
    assert suggest_steep(lrs, ORACLE_19) == lrs[3]
    assert suggest_steep(lrs[:1], ORACLE_19[:1]) is None


def test_suggest_lr_rejects_unknown_rule():
    with pytest.raises(ValueError, match="unknown lr suggestion rule"):
        suggest_lr("slide", [1.0, 2.0], [1.0, 0.5])
