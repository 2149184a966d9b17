"""The suite's own time limit (tests/time_limit.py), tried on small suites run by pytest in a
process of their own: a hang fails its test and says where, and never holds up the run."""

from __future__ import annotations

import time

import pytest

from tests.processes import REPO

pytestmark = pytest.mark.time_limit(60)

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = session
asyncio_default_test_loop_scope = session
time_limit = 1
time_limit_grace = 2
"""


@pytest.fixture(autouse=True)
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # tests.time_limit, in the inner runs


def run(pytester: pytest.Pytester, source: str) -> tuple[pytest.RunResult, float]:
    pytester.makeini(INI)
    pytester.makepyfile(test_inner=source)
    began = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "tests.time_limit", "-p", "no:cacheprovider",
                                           timeout=50)
    return result, time.monotonic() - began


def test_a_hung_await_fails_its_test_with_the_awaits_and_the_run_goes_on(
        pytester: pytest.Pytester) -> None:
    result, seconds = run(pytester, """
import asyncio
import pytest

async def test_hangs():
    never = asyncio.Event()
    await never.wait()

@pytest.fixture
async def stuck_fixture():
    await asyncio.Event().wait()
    yield

async def test_hangs_in_setup(stuck_fixture):
    pass

async def test_after():
    await asyncio.sleep(0)
""")
    result.assert_outcomes(passed=1, failed=1, errors=1)
    output = result.stdout.str()
    assert "test_inner.py::test_hangs: call took over 1 s (the time limit)" in output
    assert "test_inner.py::test_hangs_in_setup: setup took over 1 s" in output
    # Each task's chain of awaits, down to the line that waits, and every thread.
    assert "await never.wait()" in output
    assert "--- thread MainThread" in output
    assert seconds < 30


def test_a_hang_the_loop_cannot_end_stops_the_run_and_says_where(
        pytester: pytest.Pytester) -> None:
    result, seconds = run(pytester, """
import asyncio
import time

async def test_ignores_the_cancel():
    while True:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass

def test_blocks_outside_asyncio():
    time.sleep(60)
""")
    assert result.ret == 1
    output = result.stdout.str() + result.stderr.str()
    assert "test_ignores_the_cancel: call took over 1 s (the time limit); the run stops here" \
        in output
    assert "await asyncio.Event().wait()" in output  # where the task waits, as it was
    assert "test_blocks_outside_asyncio" not in output  # never reached
    assert seconds < 30


def test_a_blocking_call_stops_the_run_with_every_thread(pytester: pytest.Pytester) -> None:
    result, seconds = run(pytester, """
import time

def test_blocks_outside_asyncio():
    time.sleep(60)
""")
    assert result.ret == 1
    output = result.stdout.str() + result.stderr.str()
    assert "test_blocks_outside_asyncio: call took over 1 s (the time limit); the run stops " \
        "here" in output
    assert "time.sleep(60)" in output  # the main thread's stack
    assert seconds < 30
