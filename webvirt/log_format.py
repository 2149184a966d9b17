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

# Everything a terminal or a line-splitting log reader could take for a line break or an
# escape sequence: C0, DEL, C1 and the Unicode line and paragraph separators.
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_ESCAPES |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}
_KEEP_NEWLINES = {**_ESCAPES, ord("\n"): "\n"}


def _any_spelling(word: str) -> str:
    """The word with each letter as it is or percent-encoded, as a raw query may spell a key
    (the Guard takes `%74oken=`: yarl decodes it); the case comes from the pattern's (?i)."""
    return "".join(f"(?:{c}|%{ord(c.lower()):02x}|%{ord(c.upper()):02x})" for c in word)


# A token where it stands as a credential: a query's value (any case and spelling of the key:
# ?TOKEN=, &access_token=, ?%74oken=) or an Authorization header's Bearer value, as aiohttp's
# parser errors quote them from the raw request (in repr, so a tab reads \t). Only there: a
# token's text elsewhere is no credential, and hiding it everywhere garbled unrelated text.
# webvirt's own messages name the credential "TOKEN" (Bearer TOKEN, ?token=TOKEN): left as is.
_VALUE_CHAR = r"[^\s&'\"\\]"
_SECRET_PATTERNS = re.compile(rf"(?i)({_any_spelling('token')}=|bearer(?:\s|\\t)+)"
                              rf"(?!(?-i:TOKEN)(?!{_VALUE_CHAR})){_VALUE_CHAR}+")
REDACTED = "***"


def escape(text: str, keep_newlines: bool = False) -> str:
    if text.isprintable():  # nearly every line: nothing to do
        return text
    return text.translate(_KEEP_NEWLINES if keep_newlines else _ESCAPES)


class SafeFormatter(logging.Formatter):
    """The message is escaped onto one line; a traceback keeps its lines but indented, so
    every line that starts in the first column is the start of a real record."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
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
        # Cheaper than the pattern on each line. A key spelled as is has "oken=" (any case),
        # one with a letter percent-encoded has "%".
        lowered = text.lower()
        if "oken=" in lowered or "bearer" in lowered or "%" in text:
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
