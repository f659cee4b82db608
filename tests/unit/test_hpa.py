"""The HPA model (harness/hpa.py) against the examples of Kubernetes' documentation, and its
invariants under any load (Hypothesis): bounds, the scale-up rate, no change inside the
tolerance, and a scale-down held for the stabilization window."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from harness.hpa import Autoscaler, Rules, Sample, recommend

FAST_UP = Rules(0, (("Percent", 100, 15), ("Pods", 4, 15)), "Max")  # the API's default
NO_WAIT_DOWN = Rules(0, (("Percent", 100, 15),), "Max")


def hpa(
    replicas: int,
    *,
    target: float = 100,
    up: Rules = FAST_UP,
    down: Rules = NO_WAIT_DOWN,
    bounds: tuple[int, int] = (1, 100),
) -> Autoscaler:
    return Autoscaler(bounds[0], bounds[1], target, None, 1.0, up, down, replicas=replicas)


def test_the_documented_ratio_doubles_or_halves() -> None:
    # "if the current metric value is 200m, and the desired value is 100m, the number of
    # replicas will be doubled ... If the current value is instead 50m, you'll halve".
    assert hpa(4).sync(Sample(15, 4 * 200, 0)) == 8
    assert hpa(4).sync(Sample(15, 4 * 50, 0)) == 2


def test_within_the_tolerance_nothing_changes() -> None:
    assert hpa(10).sync(Sample(15, 10 * 109, 0)) == 10
    assert hpa(10).sync(Sample(15, 10 * 91, 0)) == 10
    assert hpa(10).sync(Sample(15, 10 * 111, 0)) == 12  # ceil(1.11 * 10)


def test_the_default_scale_up_rate() -> None:
    # 100 % or 4 pods per 15 s, whichever is more: 1 -> 5 -> 10 -> 20.
    autoscaler = hpa(1)
    load = [Sample(15 * (i + 1), 10_000, 0) for i in range(3)]
    assert [r for _, r in recommend(autoscaler, load)] == [5, 10, 20]


def test_a_scale_down_waits_for_its_stabilization_window() -> None:
    autoscaler = hpa(10, down=Rules(300, (("Percent", 100, 15),), "Max"))
    autoscaler.sync(Sample(0, 1000, 0))  # at target: the window remembers 10
    held = [autoscaler.sync(Sample(t, 200, 0)) for t in range(15, 300, 15)]
    assert set(held) == {10}
    assert autoscaler.sync(Sample(315, 200, 0)) == 2


def test_cpu_utilization_against_the_request() -> None:
    autoscaler = Autoscaler(1, 20, None, 70, 0.5, FAST_UP, NO_WAIT_DOWN, replicas=4)
    # 4 pods using 2.8 cores of 4 x 0.5 requested: 140 % of a 70 % target -> 8 pods.
    assert autoscaler.sync(Sample(15, 0, 2.8)) == 8


@given(
    start=st.integers(1, 30),
    loads=st.lists(st.floats(0, 10_000, allow_nan=False), min_size=1, max_size=40),
)
def test_any_load_stays_within_bounds_and_the_scale_up_rate(start: int, loads: list[float]) -> None:
    autoscaler = hpa(start, bounds=(2, 30))
    autoscaler.replicas = min(max(start, 2), 30)
    before = autoscaler.replicas
    for index, load in enumerate(loads):
        at = 15.0 * (index + 1)
        after = autoscaler.sync(Sample(at, load, 0))
        assert 2 <= after <= 30
        if after > before:  # at most max(2x, +4) per 15 s period
            assert after <= max(2 * before, before + 4)
        before = after


@given(load=st.floats(1, 5_000, allow_nan=False), syncs=st.integers(2, 30))
def test_a_steady_load_settles_and_never_flaps(load: float, syncs: int) -> None:
    autoscaler = hpa(3, bounds=(1, 1000), down=Rules(300, (("Percent", 25, 60),), "Min"))
    replicas = [
        r for _, r in recommend(autoscaler, [Sample(15 * i, load, 0) for i in range(syncs)])
    ]
    changes = [b for a, b in itertools.pairwise(replicas) if a != b]
    assert changes == sorted(changes) or changes == sorted(changes, reverse=True), replicas
