"""Text shown to people, made safe to show: :func:`printable`.

Every name that came from a caller or from the repository (refs, paths, mount
sources, error messages quoting them) goes through it before composefsctl prints
it or composefsd logs it, so that a newline cannot forge a row or a log entry and
an escape sequence cannot drive the terminal. (The dumpfile's byte escaping is
:mod:`composefsd.image.escape`; this is a module of its own because composefsctl
needs only this, and that one compiles its patterns when it loads.)
"""

from __future__ import annotations

__all__ = ["printable"]

_PRINTABLE_SIMPLE = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` with backslashes doubled and every character ``str.isprintable()``
    refuses (controls, line and paragraph separators, bidi overrides, lone
    surrogates, ...) as a ``\\n``, ``\\xhh``, ``\\uhhhh`` or ``\\Uhhhhhhhh`` escape: one
    line of visible characters that says unambiguously what ``text`` holds."""
    if text.isprintable() and "\\" not in text:
        return text
    out: list[str] = []
    for ch in text:
        simple = _PRINTABLE_SIMPLE.get(ch)
        if simple is not None:
            out.append(simple)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)
