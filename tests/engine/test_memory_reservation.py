"""Jobs running side by side plan with each other: what one job planned stays reserved until it
ends and is subtracted from what another may plan (engine.memory_guard.job_reservation)."""
from __future__ import annotations

import threading

import pytest

from engine import memory_guard
from engine.memory_guard import MemoryBudgetError, job_reservation, plan_batch, reserved_bytes

MB = 1 << 20


@pytest.fixture(autouse=True)
def thousand_mb_free(monkeypatch):
    monkeypatch.delenv("FINEMASK_MEMORY_LIMIT", raising=False)
    monkeypatch.setattr(memory_guard.tiling, "available_memory", lambda device="cpu": 1000 * MB)


def plan(fixed_mb, item_mb, wanted=8):
    return plan_batch(fixed_bytes=fixed_mb * MB, item_bytes=item_mb * MB, wanted=wanted, device="cpu",
                      what="a test job", fraction=1.0)


def run_in_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", _catch(fn)))
    thread.start()
    thread.join(10)
    return out["value"]


def _catch(fn):
    try:
        return fn()
    except MemoryBudgetError as exc:
        return exc


def test_a_running_jobs_plan_is_subtracted_from_another_jobs_budget():
    started, finish = threading.Event(), threading.Event()

    def first_job():
        with job_reservation():
            assert plan(400, 100, wanted=2) == 2  # plans 600 MB of the 1000
            started.set()
            finish.wait(10)

    runner = threading.Thread(target=first_job)
    runner.start()
    assert started.wait(10)
    try:
        assert reserved_bytes("cpu") == 600 * MB
        assert memory_guard.free_bytes("cpu") == 400 * MB
        # a second job sees 400 MB: a batch of 8 x 100 MB shrinks to 3 beside its 100 MB fixed part
        assert run_in_thread(lambda: _in_job(lambda: plan(100, 100))) == 3
        # and a job that needs more than what is left is refused with the figures
        refused = run_in_thread(lambda: _in_job(lambda: plan(500, 10)))
        assert isinstance(refused, MemoryBudgetError) and "a test job" in str(refused)
    finally:
        finish.set()
        runner.join(10)
    # once the first job has ended, its memory is free again
    assert reserved_bytes("cpu") == 0
    assert run_in_thread(lambda: _in_job(lambda: plan(500, 10))) == 8


def _in_job(fn):
    with job_reservation():
        return fn()


def test_a_job_reserves_its_largest_plan_and_never_counts_against_itself():
    with job_reservation():
        plan(100, 100, wanted=2)  # 300 MB
        plan(50, 10, wanted=1)  # a smaller later step keeps the larger reservation
        assert reserved_bytes("cpu") == 0  # its own plans do not shrink its own budget
        seen = run_in_thread(lambda: reserved_bytes("cpu"))
        assert seen == 300 * MB
        assert plan(900, 10, wanted=1) == 1  # the job itself may still plan with all free memory
    assert run_in_thread(lambda: reserved_bytes("cpu")) == 0


def test_plans_outside_a_job_reserve_nothing():
    plan(500, 100, wanted=1)
    assert run_in_thread(lambda: reserved_bytes("cpu")) == 0
