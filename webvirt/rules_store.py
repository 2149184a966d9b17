"""The USB rules, kept in STATE_DIR/rules.sqlite3: the only module that opens that file.

sqlite3 blocks, and a connection may only be used by the thread that opened it, so the store
owns one worker thread that opens the database and makes every call on it; the event loop
awaits it. Writes run one after the other, each in a transaction of its own, and listeners
hear of each once it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

from webvirt import deadline
from webvirt.errors import ApiError
from webvirt.rules import Rule, RuleError, RuleSpec, UsbIdMatch, parse_match

log = logging.getLogger(__name__)
T = TypeVar("T")

FILE_NAME = "rules.sqlite3"
LOCK_NAME = "webvirt.lock"  # held by the webvirt that uses the folder; holds its process id
Change = Literal["added", "updated", "deleted"]
# Called on the event loop after a committed write, with the rule as it is now (as it was,
# for "deleted"). Must not block.
Listener = Callable[[Change, Rule], None]
# Aliases: inside RuleStore, `list` is its method.
Rules = list[Rule]
Rows = list[tuple[Any, ...]]

# PRAGMA user_version counts the steps applied; a later webvirt appends steps, never edits one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the rules
        """CREATE TABLE rules (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a deleted id never returns
            domain TEXT NOT NULL,
            domain_uuid TEXT NOT NULL,
            vendor_id TEXT,
            product_id TEXT,
            serial TEXT,
            port TEXT,
            enabled INTEGER NOT NULL CHECK (enabled IN (0, 1)),
            persistent INTEGER NOT NULL CHECK (persistent IN (0, 1)),
            created REAL NOT NULL,
            CHECK ((vendor_id IS NULL) = (product_id IS NULL)),
            CHECK ((port IS NULL) != (vendor_id IS NULL)),
            CHECK (serial IS NULL OR port IS NULL)
        ) STRICT""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
COLUMNS = ("id, domain, domain_uuid, vendor_id, product_id, serial, port, enabled, persistent, "
           "created")


class StoreFailed(ApiError):
    status = 503
    code = "rule_store_failed"


class StoreTimeout(ApiError):
    status = 504
    code = "rule_store_timeout"


class RuleStore:
    def __init__(self, state_dir: Path, timeout: float = 30.0):
        self.path = state_dir / FILE_NAME
        self.timeout = timeout  # seconds a request waits for the store's thread
        self.listeners: list[Listener] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webvirt-rules")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    async def open(self) -> None:
        """Create the state folder (mode 0700) and the database if need be, and bring its
        schema up to date; StoreFailed says why it cannot."""
        try:
            # Not bounded: a start-up, not a request (and one given up would leave the lock
            # taken by the thread that goes on).
            await asyncio.wrap_future(self._executor.submit(self._open))
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        """After every write already asked for; the thread ends."""
        await asyncio.wrap_future(self._executor.submit(self._close))
        self._executor.shutdown(wait=True)

    async def list(self) -> Rules:
        """Every rule, by id."""
        return await self._run(self._select, "ORDER BY id", ())

    async def get(self, rule_id: int) -> Rule | None:
        rules = await self._run(self._select, "WHERE id = ?", (rule_id,))
        return rules[0] if rules else None

    async def add(self, spec: RuleSpec, domain_uuid: str) -> Rule:
        rule = await self._write("added", partial(self._insert, spec, domain_uuid, time.time()))
        assert rule is not None
        return rule

    async def replace(self, rule_id: int, spec: RuleSpec, domain_uuid: str) -> Rule | None:
        """The rule with its fields replaced (its id and age kept); None if there is none."""
        return await self._write("updated", partial(self._update, rule_id, spec, domain_uuid))

    async def delete(self, rule_id: int) -> Rule | None:
        """The rule that was deleted; None if there was none."""
        return await self._write("deleted", partial(self._delete, rule_id))

    async def integrity_check(self) -> str:
        """SQLite's full check of the file: "ok", or what is damaged."""
        rows = await self._run(self._query, "PRAGMA integrity_check", ())
        return "; ".join(str(row[0]) for row in rows)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        job = self._executor.submit(partial(function, *args))
        return await self._bounded(job, asyncio.wrap_future(job), "read the rules")

    async def _write(self, change: Change, write: Callable[[], Rule | None]) -> Rule | None:
        job = self._executor.submit(write)
        done = asyncio.wrap_future(job)
        # Listeners hear of a committed write even when the request that asked for it is
        # cancelled meanwhile (the client left): the write goes on, so must the news of it.
        done.add_done_callback(partial(self._notify, change))
        return await self._bounded(job, asyncio.shield(done), "save the change")

    async def _bounded(self, job: Future[Any], done: Awaitable[T], what: str) -> T:
        """What the store's thread answers, within the request's time (a stuck disk, or a
        write behind one, must not hold a request for ever)."""
        limit, _budget = deadline.within(self.timeout)
        try:
            async with asyncio.timeout(limit) as timeout:
                return await done
        except TimeoutError:
            if not timeout.expired():
                raise
            outcome = "it was not done" if job.cancel() else "it may still be done"
            raise StoreTimeout(f"the rule store ({self.path}) could not {what} within "
                               f"{limit:g} s; {outcome}") from None

    def _notify(self, change: Change, done: asyncio.Future[Rule | None]) -> None:
        if done.cancelled() or done.exception() is not None or done.result() is None:
            return
        rule = done.result()
        assert rule is not None
        for listener in list(self.listeners):
            try:
                listener(change, rule)
            except Exception:  # one listener's bug must not hide the change from the others
                log.exception("rule listener %r failed on rule %d %s", listener, rule.id, change)

    # What follows runs on the store's thread.

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            raise StoreFailed(f"the state folder {self.path.parent} is a file") from None
        except OSError as err:
            raise StoreFailed(f"cannot create the state folder {self.path.parent}: "
                              f"{err.strerror or err}") from None
        try:
            # isolation_level=None: no implicit transactions; each write says BEGIN itself.
            db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        except sqlite3.Error as err:
            raise StoreFailed(f"cannot open {self.path}: {err} (can webvirt write to "
                              f"{self.path.parent}?)") from None
        try:
            self._lock_fd = self._lock()
            self._prepare(db)
        except sqlite3.Error as err:
            db.close()
            self._unlock()
            raise StoreFailed(f"cannot use {self.path}: {err}") from None
        except StoreFailed:
            db.close()
            self._unlock()
            raise
        self._db = db

    def _lock(self) -> int:
        """One webvirt per state folder: a second one would act on the same rules, and hear
        nothing of the first one's changes. The lock goes with the process, however it ends."""
        path = self.path.parent / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StoreFailed(f"cannot open {path}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreFailed(f"the state folder {self.path.parent} is in use by another "
                              f"webvirt (process {holder}); give each webvirt a --state-dir "
                              "of its own") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            os.close(fd)
            raise StoreFailed(f"cannot write {path}: {err.strerror or err}") from None
        return fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _prepare(self, db: sqlite3.Connection) -> None:
        # WAL: a write appends to the log, so a crash mid-write (even mid-fsync) leaves the
        # last committed state intact, and readers never see a half transaction.
        # synchronous=FULL: a commit returns only after the log is on disk, so a rule the API
        # has confirmed survives a power cut too; NORMAL could lose the latest commits then.
        # Rules are written by hand, rarely: the fsync per write costs nothing that matters.
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreFailed(f"cannot use {self.path}: journal mode {mode}, not WAL")
        db.execute("PRAGMA synchronous=FULL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreFailed(f"{self.path} is damaged ({check}); move it aside to start "
                              "with no rules")
        self._migrate(db)

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreFailed(f"{self.path} is from a newer webvirt (schema {version}, this "
                              f"one knows {SCHEMA_VERSION})")
        for step in range(version, SCHEMA_VERSION):
            with _transaction(db):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
                # Part of the same transaction: a step is applied whole or not at all.
                db.execute(f"PRAGMA user_version = {step + 1}")
            log.info("rules database %s: schema %d", self.path, step + 1)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._unlock()

    def _query(self, sql: str, parameters: tuple[Any, ...]) -> Rows:
        if self._db is None:
            raise StoreFailed("the rule store is closed")
        try:
            return self._db.execute(sql, parameters).fetchall()
        except sqlite3.Error as err:
            log.error("reading %s failed: %s", self.path, err)
            raise StoreFailed(f"cannot read the rules: {err}") from None

    def _select(self, where: str, parameters: tuple[Any, ...]) -> Rules:
        return [_rule(row) for row in self._query(f"SELECT {COLUMNS} FROM rules {where}",
                                                  parameters)]

    def _change(self, sql: str, parameters: tuple[Any, ...]) -> Rule | None:
        """One statement in a transaction of its own; the row it wrote (or deleted)."""
        if self._db is None:
            raise StoreFailed("the rule store is closed")
        try:
            with _transaction(self._db):
                rows = self._db.execute(sql, parameters).fetchall()
        except sqlite3.Error as err:
            log.error("writing %s failed: %s", self.path, err)
            raise StoreFailed(f"cannot save the rules: {err}") from None
        return _rule(rows[0]) if rows else None

    def _insert(self, spec: RuleSpec, domain_uuid: str, created: float) -> Rule | None:
        return self._change(
            "INSERT INTO rules (domain, domain_uuid, vendor_id, product_id, serial, port, "
            f"enabled, persistent, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING "
            f"{COLUMNS}", (*_fields(spec, domain_uuid), created))

    def _update(self, rule_id: int, spec: RuleSpec, domain_uuid: str) -> Rule | None:
        return self._change(
            "UPDATE rules SET domain = ?, domain_uuid = ?, vendor_id = ?, product_id = ?, "
            "serial = ?, port = ?, enabled = ?, persistent = ? WHERE id = ? RETURNING "
            f"{COLUMNS}", (*_fields(spec, domain_uuid), rule_id))

    def _delete(self, rule_id: int) -> Rule | None:
        return self._change(f"DELETE FROM rules WHERE id = ? RETURNING {COLUMNS}", (rule_id,))


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (SQLite may have rolled back
    already, after a full disk for one)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _fields(spec: RuleSpec, domain_uuid: str) -> tuple[Any, ...]:
    match = spec.match
    ids = (match.vendor_id, match.product_id, match.serial, None) \
        if isinstance(match, UsbIdMatch) else (None, None, None, match.port)
    return (spec.domain, domain_uuid, *ids, int(spec.enabled), int(spec.persistent))


def _rule(row: tuple[Any, ...]) -> Rule:
    rule_id, domain, domain_uuid, vendor_id, product_id, serial, port, enabled, persistent, \
        created = row
    match = {"vendor_id": vendor_id, "product_id": product_id, "serial": serial, "port": port}
    try:
        parsed = parse_match({k: v for k, v in match.items() if v is not None})
    except RuleError as err:
        raise StoreFailed(f"rule {rule_id} in the database is not valid: {err}") from None
    return Rule(id=rule_id, domain=domain, domain_uuid=domain_uuid, match=parsed,
                enabled=bool(enabled), persistent=bool(persistent), created=created)
