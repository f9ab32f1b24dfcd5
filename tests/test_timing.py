"""timing.compare: warm-up, interleaved rounds with the same count per side, medians with spread, conditions."""

import json
import time

import pytest

from topotorch.timing import compare, conditions, median_seconds


def test_compare_interleaves_sides_with_equal_counts_and_records_conditions():
    order = []
    c = compare({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, reps=4, warmup=1)
    # one warm-up round, then rounds whose order rotates: a b, b a, a b, b a
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(c.sides["a"].seconds) == len(c.sides["b"].seconds) == 4
    d = c.as_dict()
    assert d["threads"] >= 1 and d["reps"] == 4 and d["warmup"] == 1
    assert set(d["sides"]["a"]) >= {"median_ms", "iqr_ms", "min_ms", "max_ms", "n"}
    assert "a/b" in d["ratios"] and "b/a" in d["ratios"]
    json.dumps(d)
    assert isinstance(conditions()["threads"], int)


def test_ratio_of_medians_orders_a_slow_and_a_fast_side():
    c = compare({"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.001)}, reps=5, warmup=1)
    assert c.ratio("slow", "fast") > 1.5
    lo, hi = c.ratio_range("slow", "fast")
    assert lo <= c.ratio("slow", "fast") <= hi
    assert "faster than slow" in c.summary("slow", "fast")
    sp = c.sides["fast"].spread
    assert sp["min"] <= sp["q1"] <= c.median("fast") <= sp["q3"] <= sp["max"]


def test_setup_runs_untimed_before_every_call_and_inner_divides():
    calls = []
    c = compare({"x": lambda: calls.append("x")}, reps=3, warmup=2, setup=lambda n: calls.append("setup"), inner=4)
    assert calls.count("setup") == 5 and calls.count("x") == 2 + 3 * 4
    assert len(c.sides["x"].seconds) == 3


def test_bad_arguments_and_median_seconds():
    with pytest.raises(ValueError):
        compare({}, reps=3)
    with pytest.raises(ValueError):
        compare({"a": lambda: None}, reps=0)
    with pytest.raises(ValueError):
        median_seconds(lambda: None, reps=0)
    assert median_seconds(lambda: None, reps=3) >= 0
