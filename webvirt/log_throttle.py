"""Warnings that someone else can cause once per message (an MQTT command flood): one line
per message template per so many seconds, saying how many were held back."""

from __future__ import annotations

import logging
import time


class Throttle:
    """At most one go per `every_s` seconds, counting the ones held back meanwhile."""

    __slots__ = ("every_s", "held", "next_at")

    def __init__(self, every_s: float):
        self.every_s = every_s
        self.held = 0
        self.next_at = 0.0

    def take(self) -> int | None:
        """None: hold this one back; else how many were held back since the last go."""
        now = time.monotonic()
        if now < self.next_at:
            self.held += 1
            return None
        held, self.held, self.next_at = self.held, 0, now + self.every_s
        return held


class Throttled(logging.Filter):
    """One warning per message template per `every_s` seconds, saying how many were held."""

    def __init__(self, every_s: float):
        super().__init__()
        self.every_s = every_s
        self._throttles: dict[str, Throttle] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        held = self._throttles.setdefault(str(record.msg), Throttle(self.every_s)).take()
        if held is None:
            return False
        if held:
            record.msg = (f"{record.getMessage()} (and {held} more like it in the last "
                          f"{self.every_s:g} s)")
            record.args = ()
        return True
