"""The expensive-query budget (app.services.admission.Budget) under generated timelines of
queries: whatever their arrivals and durations, the database time a worker spends on them in
any stretch of time stays within `share` of it plus one full query, and a worker that waits
as long as `wait()` says is always let in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.services.admission import Budget

SHARE = 0.25
CAPACITY = 2.0

# (gap before the query arrives, its duration), in seconds
queries = st.lists(
    st.tuples(st.floats(0, 10, allow_nan=False), st.floats(0, 4, allow_nan=False)),
    max_size=60,
)


@given(queries)
def test_time_spent_stays_within_the_share(timeline: list[tuple[float, float]]) -> None:
    budget = Budget.full(SHARE, CAPACITY, now=0.0)
    now = 0.0
    runs: list[tuple[float, float]] = []  # (start, end) of every admitted query, one at a time
    for gap, duration in timeline:
        now += gap
        now += budget.wait(now)  # a caller that waits its turn
        assert budget.wait(now) == 0, "told to wait, then still not let in"
        start, now = now, now + duration
        budget.spend(duration, now)
        runs.append((start, now))
    for i, (first_start, _) in enumerate(runs):
        for _, last_end in runs[i:]:
            spent = sum(end - start for start, end in runs if first_start <= start < last_end)
            allowed = (
                SHARE * (last_end - first_start)
                + CAPACITY
                + max((end - start for start, end in runs), default=0)
            )
            assert spent <= allowed + 1e-6, (spent, allowed)


@given(st.floats(0.01, 100, allow_nan=False), st.floats(0, 100, allow_nan=False))
def test_the_balance_refills_to_capacity_and_no_further(spent: float, idle: float) -> None:
    budget = Budget.full(SHARE, CAPACITY, now=0.0)
    budget.spend(spent, 0.0)
    waited = budget.wait(0.0)
    budget.wait(idle)
    assert budget.balance <= CAPACITY
    if idle >= waited:
        assert budget.wait(idle) == 0
    elif idle < waited - 1e-5:  # wait() rounds up by a microsecond of balance
        assert budget.wait(idle) > 0


async def test_quick_queries_are_free_and_slow_ones_pay_their_whole_time() -> None:
    from app.services.admission import FREE_SECONDS, QueryGate

    now = [100.0]
    gate = QueryGate(concurrency=1, share=SHARE, timeout=CAPACITY, clock=lambda: now[0])
    for took, balance in (
        (FREE_SECONDS / 2, CAPACITY),
        (FREE_SECONDS * 4, CAPACITY - FREE_SECONDS * 4),
    ):
        async with gate.admit("a search", "q"):
            now[0] += took
        gate.budget._refill(now[0])  # no refill: the balance was full
        assert abs(gate.budget.balance - balance) < 1e-9, (took, gate.budget.balance)


async def test_a_quick_attempt_runs_while_the_budget_lasts_and_a_cut_one_pays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    import pytest

    from app.services import admission
    from app.services.admission import NotQuick, QueryGate

    monkeypatch.setattr(admission, "QUICK_SECONDS", 0.05)
    now = [0.0]
    gate = QueryGate(concurrency=1, share=SHARE, timeout=CAPACITY, clock=lambda: now[0])
    # No cap on how many run at once: twenty are inside together.
    inside = 0
    release = asyncio.Event()

    async def hold() -> None:
        nonlocal inside
        async with gate.quickly():
            inside += 1
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(20)]
    while inside < 20:
        await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*holders)
    assert gate.budget.balance == CAPACITY, "quick ones that finish are not charged"

    # One that runs out of its time is cut (NotQuick), and pays what it took.
    async def too_slow() -> None:
        async with gate.quickly():
            now[0] += 1.0
            await asyncio.sleep(admission.QUICK_SECONDS * 4)

    with pytest.raises(NotQuick):
        await too_slow()
    assert abs(gate.budget.balance - (CAPACITY - 1.0)) < 1e-9
    # A spent budget: no quick attempt until it refills.
    gate.budget.spend(CAPACITY * 2, now[0])
    with pytest.raises(NotQuick):
        async with gate.quickly():
            pass
    now[0] += CAPACITY * 3 / SHARE
    async with gate.quickly():
        pass
