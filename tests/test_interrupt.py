"""interrupt.poll, the one wait loop: what it returns, when it gives up, and that a signal ends it."""

from __future__ import annotations

import signal

import pytest

from mnist_sweep import interrupt


def test_poll_returns_the_first_answer() -> None:
    answers = iter([None, None, "ready"])
    assert interrupt.poll(lambda: next(answers), every=0.01, timeout=5) == "ready"


def test_poll_gives_up_with_none_after_the_timeout() -> None:
    tries: list[int] = []
    assert interrupt.poll(lambda: tries.append(1), every=0.01, timeout=0.05) is None
    assert len(tries) >= 2


def test_a_falsy_answer_other_than_none_ends_the_wait() -> None:
    assert interrupt.poll(lambda: "", every=0.01, timeout=1) == ""


def test_a_signal_while_waiting_raises_interrupted() -> None:
    tries: list[int] = []

    def never() -> None:
        tries.append(1)
        if len(tries) == 2:
            signal.raise_signal(signal.SIGTERM)  # recorded by the deferred handler, acted on by poll

    try:
        with interrupt.deferred_signals(), pytest.raises(interrupt.Interrupted) as stopped:
            interrupt.poll(never, every=0.01)
    finally:
        interrupt.acknowledge()  # acted on: later tests in this process see no pending signal
    assert stopped.value.exit_code == 143 and len(tries) == 2
