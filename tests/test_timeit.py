"""``asyncworker.utils.Timeit``: the seed's examples, on trio and on asyncio."""

from __future__ import annotations

import itertools
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from asyncworker.utils import Timeit

# Marked here (not only by conftest after collection) so that anyio uses this
# module's anyio_backend fixture instead of re-parametrizing every test.
pytestmark = pytest.mark.anyio


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class FakeClock:
    """A clock that advances only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """An async callback with the seed's signature (including its ``dog`` kwarg)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(
        self,
        name: str,
        time_delta: float,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
        dog: str | None = None,
    ) -> None:
        self.calls.append(
            {
                "name": name,
                "time_delta": time_delta,
                "exc_type": exc_type,
                "exc_val": exc_val,
                "exc_tb": exc_tb,
                "dog": dog,
            }
        )


async def test_reports_name_and_elapsed_time() -> None:
    clock, recorder = FakeClock(), Recorder()
    async with Timeit(name="xablau-access-time", callback=recorder, clock=clock):
        clock.advance(1.5)
    assert recorder.calls == [
        {
            "name": "xablau-access-time",
            "time_delta": 1.5,
            "exc_type": None,
            "exc_val": None,
            "exc_tb": None,
            "dog": None,
        }
    ]


async def test_report_passes_a_timing_measured_by_the_caller() -> None:
    recorder = Recorder()
    timeit = Timeit(name="measured", callback=recorder, dog="Xablau")
    error = ValueError("boom")
    await timeit.report(0.25)
    await timeit.report(0.5, ValueError, error, None)
    assert recorder.calls == [
        {
            "name": "measured",
            "time_delta": 0.25,
            "exc_type": None,
            "exc_val": None,
            "exc_tb": None,
            "dog": "Xablau",
        },
        {
            "name": "measured",
            "time_delta": 0.5,
            "exc_type": ValueError,
            "exc_val": error,
            "exc_tb": None,
            "dog": "Xablau",
        },
    ]


async def test_default_clock_gives_a_sensible_delta() -> None:
    recorder = Recorder()
    async with Timeit(name="t", callback=recorder):
        await anyio.lowlevel.checkpoint()
    (call,) = recorder.calls
    assert isinstance(call["time_delta"], float)
    assert call["time_delta"] >= 0


async def test_kwargs_are_passed_to_the_callback() -> None:
    recorder = Recorder()
    async with Timeit(name="xablau-access-time", callback=recorder, dog="Xablau"):
        pass
    assert recorder.calls[0]["dog"] == "Xablau"


async def test_seed_callback_without_kwargs_parameter() -> None:
    # The seed's first example: no **kwargs, exception parameters defaulting to None.
    seen: list[tuple[str, float, object]] = []

    async def log_callback(
        name: str,
        time_delta: float,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        seen.append((name, time_delta, exc_type))

    clock = FakeClock()
    async with Timeit(name="n", callback=log_callback, clock=clock):
        clock.advance(0.25)
    assert seen == [("n", 0.25, None)]


async def test_callback_with_only_var_kwargs() -> None:
    seen: list[dict[str, Any]] = []

    async def callback(name: str, time_delta: float, **kwargs: Any) -> None:
        seen.append(kwargs)

    async with Timeit(name="n", callback=callback, dog="Xablau"):
        pass
    assert seen == [{"exc_type": None, "exc_val": None, "exc_tb": None, "dog": "Xablau"}]


async def test_exception_data_passed_and_exception_not_swallowed() -> None:
    clock, recorder = FakeClock(), Recorder()
    error = KeyError("boom")
    with pytest.raises(KeyError) as raised:
        async with Timeit(name="n", callback=recorder, clock=clock, dog="Xablau"):
            clock.advance(2.0)
            raise error
    assert raised.value is error
    (call,) = recorder.calls
    assert call["exc_type"] is KeyError
    assert call["exc_val"] is error
    assert call["exc_tb"] is error.__traceback__ is not None
    assert call["time_delta"] == 2.0
    assert call["dog"] == "Xablau"


async def test_sync_callback_is_called() -> None:
    seen: list[tuple[str, float, object]] = []

    def callback(name: str, time_delta: float, **kwargs: Any) -> None:
        seen.append((name, time_delta, kwargs["exc_type"]))

    clock = FakeClock()
    with pytest.raises(ValueError):
        async with Timeit(name="sync", callback=callback, clock=clock):
            clock.advance(3.0)
            raise ValueError
    assert seen == [("sync", 3.0, ValueError)]


async def test_callback_error_propagates() -> None:
    async def broken(name: str, time_delta: float, **kwargs: Any) -> None:
        raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        async with Timeit(name="n", callback=broken):
            pass


async def test_decorator_times_each_call_sequentially() -> None:
    clock, recorder = FakeClock(), Recorder()

    @Timeit(name="work", callback=recorder, clock=clock)
    async def work(seconds: float) -> float:
        clock.advance(seconds)
        return seconds * 2

    results = [await work(s) for s in (1.0, 2.0, 4.0)]
    assert results == [2.0, 4.0, 8.0]
    assert [c["time_delta"] for c in recorder.calls] == [1.0, 2.0, 4.0]
    assert work.__name__ == "work"


async def test_decorator_reports_exceptions_and_reraises() -> None:
    recorder = Recorder()

    @Timeit(name="work", callback=recorder)
    async def work() -> None:
        raise LookupError("nope")

    for _ in range(2):
        with pytest.raises(LookupError):
            await work()
    assert [c["exc_type"] for c in recorder.calls] == [LookupError, LookupError]


async def test_decorator_concurrent_calls_get_their_own_start() -> None:
    # Calls overlap: call i starts at tick i and ends at tick 10 + 2*i, so each
    # must report its own distinct delta (10 + i); a shared start would not.
    clock, recorder = FakeClock(), Recorder()
    clock.now = 0.0
    started = [anyio.Event() for _ in range(5)]
    release = [anyio.Event() for _ in range(5)]

    @Timeit(name="work", callback=recorder, clock=clock)
    async def work(i: int) -> None:
        started[i].set()
        await release[i].wait()

    async with anyio.create_task_group() as tg:
        for i in range(5):
            clock.now = float(i)
            tg.start_soon(work, i)
            await started[i].wait()
        for i in range(5):
            clock.now = 10.0 + 2 * i
            release[i].set()
            await wait_until(lambda i=i: len(recorder.calls) == i + 1)
    assert [c["time_delta"] for c in recorder.calls] == [10.0 + i for i in range(5)]


async def test_same_instance_reentrant_nested_and_concurrent() -> None:
    clock, recorder = FakeClock(), Recorder()
    clock.now = 0.0
    timeit = Timeit(name="shared", callback=recorder, clock=clock)

    # Nested: the inner block ends first and reports its own duration.
    async with timeit:
        clock.advance(1.0)
        async with timeit:
            clock.advance(2.0)
        clock.advance(4.0)
    assert [c["time_delta"] for c in recorder.calls] == [2.0, 7.0]

    # Used again afterwards (the original kept its start on self).
    async with timeit:
        clock.advance(0.5)
    assert recorder.calls[-1]["time_delta"] == 0.5

    # Concurrent tasks entering the very same instance.
    recorder.calls.clear()
    entered = [anyio.Event() for _ in range(3)]
    release = [anyio.Event() for _ in range(3)]

    async def block(i: int) -> None:
        async with timeit:
            entered[i].set()
            await release[i].wait()

    async with anyio.create_task_group() as tg:
        for i in range(3):
            clock.now = 100.0 + i
            tg.start_soon(block, i)
            await entered[i].wait()
        for i in reversed(range(3)):
            clock.now = 200.0
            release[i].set()
            await wait_until(lambda i=i: len(recorder.calls) == 3 - i)
    assert sorted(c["time_delta"] for c in recorder.calls) == [98.0, 99.0, 100.0]


@pytest.mark.parametrize("block_checkpoints", [True, False], ids=["raised", "returned"])
async def test_callback_runs_shielded_when_the_block_is_cancelled(block_checkpoints: bool) -> None:
    # Either the block raises the cancellation, or it returns normally in a
    # scope that is already cancelled: without a shield, the callback's
    # checkpoints would raise at once in both cases.
    clock, seen = FakeClock(), []

    async def slow_callback(name: str, time_delta: float, **kwargs: Any) -> None:
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        seen.append((time_delta, kwargs["exc_type"]))

    with anyio.CancelScope() as scope:
        async with Timeit(name="n", callback=slow_callback, clock=clock):
            clock.advance(5.0)
            scope.cancel()
            if block_checkpoints:
                await anyio.lowlevel.checkpoint()
                pytest.fail("the block should have been cancelled")
    if block_checkpoints:
        assert scope.cancelled_caught
        assert seen == [(5.0, anyio.get_cancelled_exc_class())]
    else:
        assert seen == [(5.0, None)]


async def test_a_callback_that_waits_runs_to_its_end_and_returns_its_errors() -> None:
    steps: list[int] = []

    async def waiting(name: str, time_delta: float, **kwargs: Any) -> None:
        for step in range(3):
            await anyio.lowlevel.checkpoint()
            steps.append(step)
        if kwargs["fail"]:
            raise ValueError("callback failed after waiting")

    async with Timeit(name="n", callback=waiting, fail=False):
        pass
    assert steps == [0, 1, 2]
    with pytest.raises(ValueError, match="after waiting"):
        async with Timeit(name="n", callback=waiting, fail=True):
            pass


async def test_a_waiting_callback_is_cancelled_by_an_outer_deadline() -> None:
    # Not cancelled when it starts: no shield, so an outer deadline stops it.
    seen: list[str] = []

    async def sleepy(name: str, time_delta: float, **kwargs: Any) -> None:
        await anyio.lowlevel.checkpoint()
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled")
            raise

    with anyio.move_on_after(0.05) as scope:
        async with Timeit(name="n", callback=sleepy):
            pass
    assert scope.cancelled_caught
    assert seen == ["cancelled"]


async def test_decorator_callback_runs_when_cancelled() -> None:
    seen: list[object] = []

    async def callback(name: str, time_delta: float, **kwargs: Any) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(kwargs["exc_type"])

    @Timeit(name="n", callback=callback)
    async def forever() -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(0.01):
        await forever()
    assert seen == [anyio.get_cancelled_exc_class()]


def test_rejects_a_non_callable_callback() -> None:
    with pytest.raises(TypeError, match="callback must be callable"):
        Timeit(name="n", callback="log")  # type: ignore[arg-type]


async def wait_until(predicate: Any) -> None:
    with anyio.fail_after(5):
        for _ in itertools.count():
            if predicate():
                return
            await anyio.lowlevel.checkpoint()


def test_a_started_callback_gets_what_the_event_loop_throws() -> None:
    # The event loop may throw into a suspended callback (asyncio does, to
    # cancel a task); the rest of a callback run by Timeit must receive it.
    from types import coroutine

    from asyncworker.utils import _resume

    @coroutine
    def suspend() -> Any:
        return (yield "suspended")

    async def callback() -> str:
        try:
            await suspend()
        except KeyError as exc:
            return f"caught {exc}"
        return "not thrown"

    started = callback()
    rest = _resume(started, started.send(None))
    assert next(rest) == "suspended"
    with pytest.raises(StopIteration) as stopped:
        rest.throw(KeyError("from the loop"))
    assert stopped.value.value == "caught 'from the loop'"
