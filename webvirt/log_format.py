"""How every log line is written: one line per record, no control characters, no secrets.

Log messages carry what clients send (paths, header values, parser errors quoting the raw
request), so a client could otherwise forge log lines with CR/LF, hide text with terminal
escapes, or get a token written to the log. The Formatter is the one place every module's
records pass through, so this is where it is handled.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from urllib.parse import quote

# Everything a terminal or a line-splitting log reader could take for a line break or an
# escape sequence: C0, DEL, C1 and the Unicode line and paragraph separators.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_ESCAPES |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_KEEP_NEWLINES = {**_ESCAPES, ord("\n"): "\n"}

# A token in a query (any case: ?TOKEN=, &access_token=) or in an Authorization header, as
# aiohttp's parser errors quote it from the raw request.
_SECRET_PATTERNS = re.compile(r"(?i)(token=|bearer\s+)[^\s&'\"\\]+")
REDACTED = "***"


def escape(text: str, keep_newlines: bool = False) -> str:
    if text.isprintable():  # nearly every line: nothing to do
        return text
    return text.translate(_KEEP_NEWLINES if keep_newlines else _ESCAPES)


class SafeFormatter(logging.Formatter):
    """The message is escaped onto one line; a traceback keeps its lines but indented, so
    every line that starts in the first column is the start of a real record."""

    def __init__(self, fmt: str, secrets: Iterable[str | None] = ()) -> None:
        super().__init__(fmt)
        literal = {form for s in secrets if s for form in (s, quote(s, safe=""))}
        self._literals = sorted(literal, key=len, reverse=True)
        self._second, self._stamp = -1, ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # The same text as logging's default, with strftime once a second instead of per line.
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"  # logging's default_msec_format

    def redact(self, text: str) -> str:
        for secret in self._literals:
            if secret in text:
                text = text.replace(secret, REDACTED)
        lowered = text.lower()
        if "token=" in lowered or "bearer" in lowered:  # cheaper than the pattern on each line
            text = _SECRET_PATTERNS.sub(lambda m: m.group(1) + REDACTED, text)
        return text

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(self.redact(record.getMessage()))
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for details in (record.exc_text, record.stack_info):
            if details:
                line += "\n" + self._indented(details)
        return line

    def _indented(self, text: str) -> str:
        lines = escape(self.redact(text), keep_newlines=True).splitlines()
        return "\n".join("    " + line for line in lines)
