"""Text that came from other users, made safe to print and log.

Owns one rule: whatever tcpidle writes to a terminal or a log -- the table,
log lines (stderr, log file, syslog), stderr summaries and errors -- carries
no control character.  Process names (any user sets its own with
prctl(PR_SET_NAME) or by writing /proc/self/comm), cgroup paths (a delegated
subtree names its own cgroups), namespace names and error texts that quote
paths reach those places; an ESC among them would let another user rewrite
root's terminal (ANSI sequences), and a newline would let it forge log lines.

`printable()` keeps valid printable text (UTF-8 included) as it is and
writes everything else as a backslash escape: C0 controls and DEL as
``\\xHH`` (``\\t``, ``\\n``, ``\\r`` by name), C1 controls as ``\\xHH``,
other non-printable code points (format characters such as U+202E
RIGHT-TO-LEFT OVERRIDE, line and paragraph separators, unassigned and
private-use code points, lone surrogates) as ``\\uHHHH``/``\\UHHHHHHHH``.
A backslash is doubled, so an escape in the output always means an escaped
character, never one the owner typed.  JSON output needs none of this: its
encoder escapes (see report.json_line).
"""

from __future__ import annotations

from typing import Dict

_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


class _Escapes(Dict[int, str]):
    """str.translate table: code point -> its escape, computed once per character seen."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if char in _NAMED:
            text = _NAMED[char]
        elif char == " " or char.isprintable():
            text = char
        elif code <= 0xFF:
            text = "\\x%02x" % code
        elif code <= 0xFFFF:
            text = "\\u%04x" % code
        else:
            text = "\\U%08x" % code
        self[code] = text
        return text


_ESCAPES = _Escapes()


def printable(text: object) -> str:
    """`text` (made a str) with every non-printable character escaped.

    >>> printable("nginx")
    'nginx'
    >>> printable("\\x1b[2Jevil\\n")
    '\\\\x1b[2Jevil\\\\n'
    >>> printable("café ☕")
    'café ☕'
    """
    text = text if isinstance(text, str) else str(text)
    # The common case, in C: nothing to escape.
    if text.isprintable() and "\\" not in text:
        return text
    return text.translate(_ESCAPES)
