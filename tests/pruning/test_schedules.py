import math

import pytest

from lightning_compress.pruning.schedules import is_update_index, progress, target_sparsity, validate_schedule


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """Eq. 1 of Zhu & Gupta (2017), written as in the paper."""
    if t < t0:
        return s_i
    t = min(t, t0 + n * dt)
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("index", range(-2, 14))
def test_cubic_is_zhu_gupta(index):
    start, end, amount = 2, 10, 0.8
    expected = zhu_gupta(index, 0.0, amount, start, end - start, 1) if index >= start else 0.0
    assert target_sparsity("cubic", index, amount, start, end) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("index", range(0, 12))
def test_linear_constant_exponential(index):
    start, end, amount = 1, 9, 0.9
    p = min(max((index - start) / (end - start), 0), 1)
    before = index < start
    assert target_sparsity("linear", index, amount, start, end) == pytest.approx(0 if before else amount * p)
    assert target_sparsity("constant", index, amount, start, end) == (0 if before else amount)
    # exponential: the surviving fraction decays geometrically, 1 - target = (1 - amount) ** p
    expected = 0 if before else 1 - (1 - amount) ** p
    assert target_sparsity("exponential", index, amount, start, end) == pytest.approx(expected)


def test_exponential_removes_the_same_fraction_of_survivors_per_equal_step():
    amount, start, end = 0.9, 0, 4
    density = [1 - target_sparsity("exponential", i, amount, start, end) for i in range(5)]
    ratios = [density[i + 1] / density[i] for i in range(4)]
    assert all(math.isclose(r, ratios[0]) for r in ratios)
    assert density[-1] == pytest.approx(1 - amount)


def test_end_equal_start_jumps_to_amount():
    assert progress(4, 5, 5) == 0.0
    assert target_sparsity("cubic", 5, 0.5, 5, 5) == 0.5
    assert target_sparsity("linear", 100, 0.5, 5, 5) == 0.5


def test_callable_gets_the_index():
    seen = []

    def schedule(i):
        seen.append(i)
        return i / 100

    assert target_sparsity(schedule, 7, 0.5, 0, 10) == 0.07
    assert seen == [7]


def test_update_indices_every_frequency_and_always_end():
    indices = [i for i in range(0, 20) if is_update_index(i, 2, 11, 4)]
    assert indices == [2, 6, 10, 11]
    assert [i for i in range(5) if is_update_index(i, 0, 3, 1)] == [0, 1, 2, 3]


@pytest.mark.parametrize("bad", ["cubicc", 3, None])
def test_unknown_schedule_names_the_options(bad):
    with pytest.raises(ValueError, match="schedule.*constant.*cubic.*exponential.*linear"):
        validate_schedule(bad)
