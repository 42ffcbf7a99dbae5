"""Where the driver runs aggregation and slice work: small work on the event loop, big work
in a worker thread; either way its answer comes later, never inside the asking command."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from p2pfl.driver import INLINE_WORK_BYTES, Driver


class FakeIO:
    def __init__(self) -> None:
        self.soon: list[Any] = []
        self.threaded: list[Any] = []

    def call_soon(self, callback: Any) -> None:
        self.soon.append(callback)

    def run_blocking(self, fn: Any, done: Any) -> None:
        self.threaded.append((fn, done))


def run(size: int, work: Any) -> tuple[FakeIO, list[tuple[Any, Any]], list[str]]:
    io, answers, ran = FakeIO(), [], []

    def tracked() -> Any:
        ran.append("work")
        return work()

    Driver._run_work(SimpleNamespace(io=io), size, tracked, lambda r, e: answers.append((r, e)))  # type: ignore[arg-type]
    return io, answers, ran


def test_small_work_runs_here_and_answers_on_the_next_turn_of_the_loop() -> None:
    io, answers, ran = run(INLINE_WORK_BYTES, lambda: 42)
    assert ran == ["work"] and io.threaded == []
    assert answers == []  # not inside the command that asked for it
    io.soon.pop()()
    assert answers == [(42, None)]


def test_a_failure_of_small_work_is_answered_like_a_worker_threads() -> None:
    def boom() -> None:
        raise ValueError("malformed slice")

    io, answers, _ = run(1, boom)
    assert answers == []
    io.soon.pop()()
    result, error = answers[0]
    assert result is None and isinstance(error, ValueError) and str(error) == "malformed slice"


def test_big_work_goes_to_a_worker_thread() -> None:
    io, answers, ran = run(INLINE_WORK_BYTES + 1, lambda: 42)
    assert ran == [] and io.soon == [] and answers == []
    fn, done = io.threaded.pop()
    done(fn(), None)
    assert ran == ["work"] and answers == [(42, None)]
