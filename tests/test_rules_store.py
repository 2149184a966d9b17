"""The rule store (webvirt/rules_store.py): what it keeps survives crashes and restarts, its
schema is versioned, and listeners hear of every committed write."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.processes import REPO
from tests.waiting import until
from webvirt.rules import PortMatch, Rule, RuleSpec, UsbIdMatch
from webvirt.rules_store import SCHEMA_VERSION, Change, RuleStore, StoreFailed

# Adds rules without end, and every third one replaces it whole, printing each write once it
# has returned (committed). Every field of a rule carries the same number, so a rule that was
# written in part would show two numbers.
WRITER = """
import asyncio, sys
from pathlib import Path
from webvirt.rules import RuleSpec, UsbIdMatch
from webvirt.rules_store import RuleStore

def say(*words):
    sys.stdout.write(" ".join(map(str, words)) + "\\n")
    sys.stdout.flush()

def spec(n):
    return RuleSpec(f"vm-{n}", UsbIdMatch("046d", f"{n % 65536:04x}", f"serial-{n}"),
                    enabled=n % 2 == 0, persistent=n % 2 == 1)

async def main():
    store = RuleStore(Path(sys.argv[1]))
    await store.open()
    n = 0
    while True:
        n += 1
        rule = await store.add(spec(n), f"uuid-{n}")
        say("added", rule.id, n)
        if n % 3 == 0:
            await store.replace(rule.id, spec(n + 100000), f"uuid-{n + 100000}")
            say("replaced", rule.id, n + 100000)

asyncio.run(main())
"""


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RuleStore]:
    store = RuleStore(tmp_path)
    await store.open()
    yield store
    await store.close()


def whole(rule: Rule) -> bool:
    """Whether every field of a rule the writer made carries the same number."""
    n = int(rule.domain.removeprefix("vm-"))
    return (rule.domain_uuid == f"uuid-{n}"
            and rule.match == UsbIdMatch("046d", f"{n % 65536:04x}", f"serial-{n}")
            and (rule.enabled, rule.persistent) == (n % 2 == 0, n % 2 == 1))


async def test_a_crash_mid_write_loses_nothing_committed_and_leaves_no_half_rule(
        tmp_path: Path) -> None:
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(tmp_path), cwd=REPO, stdout=subprocess.PIPE)
    assert writer.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while len(lines) < 60 and (line := await writer.stdout.readline()):
                lines.append(line.decode())
    finally:
        writer.kill()  # SIGKILL, wherever it is: most likely inside a write
        await writer.wait()
    assert len(lines) == 60, f"the writer ended by itself: {lines}"
    # And what it said while the kill was on its way.
    lines += (await writer.stdout.read()).decode().splitlines(keepends=True)
    committed: dict[int, int] = {}  # rule id -> the number its last confirmed write carried
    for line in lines:
        if not line.endswith("\n"):
            continue  # cut short by the kill
        _, rule_id, n = line.split()
        committed[int(rule_id)] = int(n)

    store = RuleStore(tmp_path)
    await store.open()
    try:
        assert await store.integrity_check() == "ok"
        rules = {rule.id: rule for rule in await store.list()}
    finally:
        await store.close()
    assert all(whole(rule) for rule in rules.values()), rules
    for rule_id, n in committed.items():
        assert rule_id in rules, f"committed rule {rule_id} is lost"
        # The last write may have been committed without being printed: never an older one.
        assert rules[rule_id].domain in (f"vm-{n}", f"vm-{n + 100000}"), rules[rule_id]
    assert len(rules) - len(committed) <= 1  # at most the one write the kill interrupted


async def test_the_database_is_versioned_and_journals_ahead(store: RuleStore) -> None:
    with sqlite3.connect(store.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_database_from_a_newer_webvirt_is_refused_as_it_is(tmp_path: Path) -> None:
    first = RuleStore(tmp_path)
    await first.open()
    rule = await first.add(RuleSpec("win11", PortMatch("1-4")), "uuid")
    await first.close()
    with sqlite3.connect(first.path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = RuleStore(tmp_path)
    with pytest.raises(StoreFailed, match="from a newer webvirt"):
        await newer.open()
    with sqlite3.connect(first.path) as db:  # untouched
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    again = RuleStore(tmp_path)
    await again.open()
    assert await again.list() == [rule]
    await again.close()


async def test_listeners_hear_of_a_write_whose_caller_gave_up(store: RuleStore) -> None:
    heard: list[tuple[Change, Rule]] = []
    store.listeners.append(lambda change, rule: heard.append((change, rule)))
    adding = asyncio.ensure_future(store.add(RuleSpec("win11", PortMatch("1-4")), "uuid"))
    await asyncio.sleep(0)  # the write is on the store's thread
    adding.cancel()
    await until(lambda: len(heard) == 1, 10, "the listener was called")
    assert adding.cancelled()
    assert heard[0][0] == "added"
    assert await store.list() == [heard[0][1]]


async def test_a_failing_listener_does_not_keep_the_news_from_the_others(
        store: RuleStore) -> None:
    heard: list[int] = []

    def broken(change: Change, rule: Rule) -> None:
        raise RuntimeError("a bug in a listener")

    store.listeners.extend([broken, lambda change, rule: heard.append(rule.id)])
    rule = await store.add(RuleSpec("win11", PortMatch("1-4")), "uuid")
    assert heard == [rule.id]
    assert await store.get(rule.id) == rule


async def test_nothing_is_heard_of_a_change_to_no_rule(store: RuleStore) -> None:
    heard: list[Rule] = []
    store.listeners.append(lambda change, rule: heard.append(rule))
    assert await store.replace(7, RuleSpec("win11", PortMatch("1-4")), "uuid") is None
    assert await store.delete(7) is None
    assert heard == []


async def test_one_store_per_state_folder_and_the_second_says_who_has_it(
        tmp_path: Path) -> None:
    store = RuleStore(tmp_path)
    await store.open()
    second = RuleStore(tmp_path)
    with pytest.raises(StoreFailed) as refused:
        await second.open()
    assert refused.value.detail == (
        f"the state folder {tmp_path} is in use by another webvirt (process {os.getpid()}); "
        "give each webvirt a --state-dir of its own")
    await store.close()
    third = RuleStore(tmp_path)
    await third.open()  # free again once the first has closed
    await third.close()
