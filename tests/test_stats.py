"""sstoken.stats: the stderr of a mean, Student-t quantiles, seed groups, paired differences."""
import math
import statistics

import pytest

from sstoken.stats import mean_se, paired_difference, paired_seeds, seed_groups, t95


def test_mean_se_is_the_stderr_of_the_mean():
    xs = [1.0, 1.5, 4.0, 2.5]
    m, se = mean_se(xs)
    assert m == pytest.approx(statistics.mean(xs))
    assert se == pytest.approx(statistics.stdev(xs) / 2.0)
    assert mean_se([3.0]) == (3.0, None)


def test_t95_is_students_quantile():
    from scipy.stats import t as student_t

    assert t95(3) == pytest.approx(student_t.ppf(0.975, 2)) == pytest.approx(4.302652729911275)
    assert t95(1000) == pytest.approx(1.962, abs=1e-3)


def test_seed_groups():
    assert seed_groups(["base", "full-seed0", "full-seed1", "x-y-seed2", "seed3"]) == {
        "base": {-1: 0}, "full": {0: 1, 1: 2}, "x-y": {2: 3}, "seed3": {-1: 4}}
    with pytest.raises(ValueError, match="two runs named"):
        seed_groups(["a-seed0", "a-seed0"])
    with pytest.raises(ValueError, match="two runs named"):
        seed_groups(["a", "a"])


def test_paired_difference():
    a = {0: 55.0, 1: 58.0, 2: 57.0}
    b = {2: 54.0, 0: 50.0, 1: 52.0}
    assert paired_seeds(a, b) == [0, 1, 2] and paired_seeds({-1: 1.0}, {-1: 2.0}) == []
    m, se, lo, hi = paired_difference(a, b)
    ds = [5.0, 6.0, 3.0]
    assert m == pytest.approx(statistics.mean(ds))
    assert se == pytest.approx(statistics.stdev(ds) / math.sqrt(3))
    assert (lo, hi) == pytest.approx((m - t95(3) * se, m + t95(3) * se))
    assert paired_difference({0: 1.0, 1: 2.0, 7: 9.0}, {0: 0.5, 1: 1.0}) == \
        pytest.approx((0.75, 0.25, 0.75 - t95(2) * 0.25, 0.75 + t95(2) * 0.25))  # only shared seeds
    assert paired_difference({0: 1.0}, {0: 0.0}) is None                  # one pair: no interval
    assert paired_difference({0: 1.0, 1: None}, {0: 0.0, 1: 1.0}) is None  # a seed lacks the value
    assert paired_difference({-1: 1.0, 0: 2.0}, {-1: 1.0, 0: 1.0}) is None  # seed -1 never pairs
