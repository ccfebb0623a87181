"""glibc ``getopt_long``'s parsing rules, for the commands that must match C's.

:func:`gnu_getopt` is a generator: it yields options one by one, in command-line
order, and raises :class:`GetoptError` only when it reaches a bad one. That
lets a caller act on each option as C does inside its ``while (getopt(...))``
loop, so that of two problems the one C reports first is the one reported.

Rules: options and operands may be mixed (GNU permutation) unless
``POSIXLY_CORRECT`` is set, in which case the first operand ends the options;
``--`` ends them too; ``-abc`` is a cluster of short options, and a short option
that takes a value takes the rest of the cluster or the next argument; long
options take ``--name=value`` or ``--name value``, and any unique prefix of a
name (an exact match wins over prefixes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

__all__ = ["GetoptError", "gnu_getopt"]

ErrorKind = Literal["invalid", "unrecognized", "ambiguous", "missing", "unexpected"]


class GetoptError(Exception):
    """glibc's diagnostic for a bad option, without the ``argv[0]: `` prefix.

    ``kind`` says which: an unknown short option (``invalid``), an unknown or
    ambiguous long option, a missing value, or a value given to a long option
    that takes none (``unexpected``).
    """

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


def _long(
    arg: str, longopts: Mapping[str, bool], args: Sequence[str], i: int
) -> tuple[str, str | None, int]:
    name, eq, value = arg[2:].partition("=")
    matches = [name] if name in longopts else [o for o in longopts if o.startswith(name)]
    if len(matches) != 1:
        if matches:
            alts = " ".join(f"'--{o}'" for o in matches)
            raise GetoptError("ambiguous", f"option '{arg}' is ambiguous; possibilities: {alts}")
        raise GetoptError("unrecognized", f"unrecognized option '{arg}'")
    opt = matches[0]
    if not longopts[opt]:
        if eq:
            raise GetoptError("unexpected", f"option '--{opt}' doesn't allow an argument")
        return opt, None, i
    if not eq:
        if i >= len(args):
            raise GetoptError("missing", f"option '--{opt}' requires an argument")
        value = args[i]
        i += 1
    return opt, value, i


def gnu_getopt(
    args: Sequence[str],
    shortopts: str,
    longopts: Mapping[str, bool] | None,
    operands: list[str],
) -> Iterator[tuple[str, str | None]]:
    """Yield ``(option, value)`` for each option of ``args`` (without argv[0]).

    ``shortopts`` is getopt's option string without a leading ``:`` ("ht:o:":
    a letter, followed by ``:`` if it takes a value); ``longopts`` maps each long
    option name to whether it takes a value, or is None for plain ``getopt``,
    which reads ``--help`` as the short options ``-``, ``h``, ... (so: "invalid
    option -- '-'"). Short options are yielded by their
    letter, long ones by their full name. Operands are appended to ``operands``
    as they are met.
    """
    takes_value = {c: shortopts[k + 1 : k + 2] == ":" for k, c in enumerate(shortopts) if c != ":"}
    posix = "POSIXLY_CORRECT" in os.environ
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            operands.extend(args[i:])
            return
        if arg.startswith("--") and longopts is not None:
            opt, value, i = _long(arg, longopts, args, i)
            yield opt, value
        elif arg.startswith("-") and arg != "-":
            j = 1
            while j < len(arg):
                c = arg[j]
                j += 1
                if c not in takes_value:
                    raise GetoptError("invalid", f"invalid option -- '{c}'")
                if not takes_value[c]:
                    yield c, None
                    continue
                if j < len(arg):
                    value = arg[j:]
                elif i < len(args):
                    value = args[i]
                    i += 1
                else:
                    raise GetoptError("missing", f"option requires an argument -- '{c}'")
                yield c, value
                break
        else:
            operands.append(arg)
            if posix:
                operands.extend(args[i:])
                return
