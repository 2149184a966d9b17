"""Logging set-up: the event loop only queues records; a thread formats and writes them.

With the access log on, formatting and writing one line per request on the event loop halved
the requests/s of a cheap request. Now a QueueHandler puts records on a queue, and a
QueueListener thread formats them (escaped and redacted: see log_format) and writes them to
stderr in batches. The access log goes further (see fast_lane): it queues a tuple and the
thread makes the LogRecord: building one on the loop cost about 15 µs a request.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from collections.abc import Callable
from logging.handlers import QueueHandler, QueueListener
from typing import Any

from webvirt.log_format import SafeFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Enough for a burst; if stderr cannot keep up for longer, records are dropped (and counted)
# rather than the memory growing or the event loop blocking.
QUEUE_SIZE = 10_000
# Once the queue is empty the thread waits this long before it looks again, so that under load
# it wakes (and takes the GIL from the event loop) once per batch, not once per record.
BATCH_SECONDS = 0.05
# Arguments that cannot change after the call: formatting them later, on the thread, gives the
# same text.
_IMMUTABLE = (str, int, float, bool, type(None))

_FAST_RECORD = {
    "levelno": logging.INFO, "levelname": "INFO", "pathname": "", "filename": "", "module": "",
    "lineno": 0, "funcName": "", "exc_info": None, "exc_text": None, "stack_info": None,
    "relativeCreated": 0.0, "thread": None, "threadName": None, "processName": None,
    "process": None, "taskName": None}

# What the fast lane queues: logger name, creation time, message and its arguments.
FastEntry = tuple[str, float, str, tuple[Any, ...]]
Entry = logging.LogRecord | FastEntry


class LoopQueueHandler(QueueHandler):
    """Queues records as cheaply as possible for the event loop thread."""

    def __init__(self, log_queue: queue.SimpleQueue[Entry]) -> None:
        super().__init__(log_queue)
        self.entries = log_queue
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The base class formats every message here. Only do what must happen now: turn
        # arguments that may change, and tracebacks (which keep frames alive), into text.
        args = record.args
        mutable_args = args and not (isinstance(args, tuple) and
                                     all(type(a) in _IMMUTABLE for a in args))
        if not mutable_args and not record.exc_info:
            return record
        record = logging.makeLogRecord(record.__dict__)  # other handlers keep the original
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record

    def enqueue(self, record: Entry) -> None:
        # A SimpleQueue is several times cheaper to put to than a bounded Queue; the bound is
        # kept here (approximately: the count may race with the thread, which is harmless).
        if self.entries.qsize() >= QUEUE_SIZE:
            self.dropped += 1
            return
        if self.dropped:
            self.entries.put_nowait((__name__, time.time(), "%d log records dropped: stderr "
                                     "did not keep up", (self.dropped,)))
            self.dropped = 0
        self.entries.put_nowait(record)


class BatchWriter(logging.StreamHandler[Any]):
    """Collects formatted lines; the listener writes them with one call per batch."""

    def __init__(self, stream: Any, formatter: logging.Formatter) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        assert self.lock is not None  # made by Handler.__init__
        with self.lock:
            if self._lines:
                lines, self._lines = self._lines, []
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()


class BatchListener(QueueListener):
    def __init__(self, log_queue: queue.SimpleQueue[Entry], writer: BatchWriter) -> None:
        super().__init__(log_queue, writer)
        self.entries = log_queue
        self.writer = writer

    def dequeue(self, block: bool) -> Entry:  # type: ignore[override]  # also FastEntry
        try:
            return self.entries.get_nowait()
        except queue.Empty:
            self.writer.flush()
            time.sleep(BATCH_SECONDS)
            return self.entries.get(block)

    def prepare(self, entry: Entry) -> logging.LogRecord:
        if isinstance(entry, logging.LogRecord):
            return entry
        # A LogRecord without LogRecord.__init__, which costs more than the rest of the line
        # (it looks up the thread, process and caller, all unused here).
        name, created, msg, args = entry
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.__dict__.update(_FAST_RECORD, name=name, msg=msg, args=args, created=created,
                               msecs=created % 1 * 1000)
        return record


def fast_lane(logger: logging.Logger) -> Callable[[str, tuple[Any, ...]], None] | None:
    """A way to log INFO records of `logger` that costs the caller one tuple and one queue put:
    the record is made on the listener thread. None unless start() routes the logger."""
    if logger.handlers or logger.filters or not logger.propagate:
        return None
    handler = next((h for h in logging.getLogger().handlers
                    if isinstance(h, LoopQueueHandler)), None)
    if handler is None:
        return None
    name = logger.name

    def log(msg: str, args: tuple[Any, ...]) -> None:
        handler.enqueue((name, time.time(), msg, args))

    return log


def start(level: str) -> Callable[[], None]:
    """Route every logger through the queue to stderr; returns the function that writes what
    is queued and stops the thread (call it before the process exits)."""
    log_queue: queue.SimpleQueue[Entry] = queue.SimpleQueue()
    writer = BatchWriter(sys.stderr, SafeFormatter(FORMAT))
    listener = BatchListener(log_queue, writer)
    root = logging.getLogger()
    before = root.level, root.handlers[:]
    for old in before[1]:
        root.removeHandler(old)
    root.setLevel(level.upper())
    handler = LoopQueueHandler(log_queue)
    root.addHandler(handler)
    listener.start()

    def stop() -> None:
        listener.stop()
        writer.flush()
        root.removeHandler(handler)
        root.setLevel(before[0])
        for old in before[1]:
            root.addHandler(old)

    return stop
