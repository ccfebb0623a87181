"""Strict checks of Varlink parameters against an interface definition.

The ``varlink`` package (31.0.0) validates calls loosely: it rounds ``1.7`` to an
``int``, takes ``true`` for ``1``, turns ``"abc"`` into ``["a", "b", "c"]``,
drops unknown nested fields and lets missing nested fields and bad enum values
through. This module compiles each method's input and output types from the
parsed IDL (:class:`varlink.scanner.Interface`) into checkers that refuse all of
that, and name the offending parameter with a path such as ``uidMap[1].count``
(the form of ``org.varlink.service.InvalidParameter``'s ``parameter``).

The rules: a field not declared is refused at any depth; a field that is not
nullable (``?``) must be present and not ``null``; ``bool`` is not ``int``,
``float`` is not ``int`` (an ``int`` is a valid ``float``), strings are not
arrays, structs and maps are JSON objects, enum values are the declared names,
``int`` fits in int64 or uint64, ``object`` is any JSON object. Every string
(values, map keys, and anything inside an ``object``) must be valid Unicode:
JSON's ``\\udcff`` escape yields a lone surrogate, which no UTF-8 encoder (a reply,
a log line, a file name) accepts. Paths in :class:`InvalidParameter` show such
characters as ``\\udcff`` text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final

from varlink.scanner import (
    Interface,
    _Alias,
    _Array,
    _CustomType,
    _Dict,
    _Enum,
    _Error,
    _Maybe,
    _Method,
    _Object,
    _Struct,
)

__all__ = ["INVALID_PARAMETER", "InterfaceValidator", "InvalidParameter"]

INVALID_PARAMETER: Final = "org.varlink.service.InvalidParameter"

_INT_MIN: Final = -(1 << 63)
_INT_MAX: Final = (1 << 64) - 1


class InvalidParameter(Exception):
    """A value does not match its type; ``parameter`` is the path to it."""

    def __init__(self, parameter: str) -> None:
        super().__init__(f"invalid parameter {parameter!r}")
        self.parameter = parameter


class _Bad(Exception):
    """Raised by a checker; ``parts`` collects the path from the inside out."""

    __slots__ = ("parts",)

    def __init__(self, part: str = "") -> None:
        self.parts = [part] if part else []


Checker = Callable[[Any], None]


def _check_bool(value: Any) -> None:
    if type(value) is not bool:
        raise _Bad()


def _check_int(value: Any) -> None:
    if type(value) is not int or not _INT_MIN <= value <= _INT_MAX:
        raise _Bad()


def _check_float(value: Any) -> None:
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise _Bad()
    elif t is not int:
        raise _Bad()


def _is_unicode(text: str) -> bool:
    """False if ``text`` holds a lone surrogate (the only str UTF-8 cannot encode)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_string(value: Any) -> None:
    if type(value) is not str or not _is_unicode(value):
        raise _Bad()


def _check_json_strings(value: Any) -> None:
    """Every string and key inside a JSON value is valid Unicode (the nesting is
    bounded by the protocol's depth limit)."""
    t = type(value)
    if t is str:
        if not _is_unicode(value):
            raise _Bad()
    elif t is list:
        for i, item in enumerate(value):
            try:
                _check_json_strings(item)
            except _Bad as e:
                e.parts.append(f"[{i}]")
                raise
    elif t is dict:
        for key, item in value.items():
            if not _is_unicode(key):
                raise _Bad(f"[{key}]")
            try:
                _check_json_strings(item)
            except _Bad as e:
                e.parts.append(f"[{key}]")
                raise


def _check_object(value: Any) -> None:
    if type(value) is not dict:
        raise _Bad()
    _check_json_strings(value)


def _check_string_set(value: Any) -> None:
    if type(value) is not dict:
        raise _Bad()
    for key, item in value.items():
        # Each member maps to the empty struct.
        if type(item) is not dict or item or not _is_unicode(key):
            raise _Bad(f"[{key}]")


class _Field:
    __slots__ = ("check", "nullable")

    def __init__(self, check: Checker, nullable: bool) -> None:
        self.check = check
        self.nullable = nullable


def _struct_checker(fields: dict[str, _Field]) -> Checker:
    required = tuple(name for name, f in fields.items() if not f.nullable)
    required_set = frozenset(required)

    def check(value: Any) -> None:
        if type(value) is not dict:
            raise _Bad()
        for name, item in value.items():
            f = fields.get(name)
            if f is None:
                raise _Bad("." + name)
            if item is None:
                if f.nullable:
                    continue
                raise _Bad("." + name)
            try:
                f.check(item)
            except _Bad as e:
                e.parts.append("." + name)
                raise
        if required and not required_set.issubset(value.keys()):
            for name in required:
                if name not in value:
                    raise _Bad("." + name)

    return check


def _enum_checker(values: frozenset[str]) -> Checker:
    def check(value: Any) -> None:
        if type(value) is not str or value not in values:
            raise _Bad()

    return check


def _maybe_checker(inner: Checker) -> Checker:
    def check(value: Any) -> None:
        if value is not None:
            inner(value)

    return check


def _array_checker(element: Checker) -> Checker:
    def check(value: Any) -> None:
        if type(value) is not list:
            raise _Bad()
        for i, item in enumerate(value):
            try:
                element(item)
            except _Bad as e:
                e.parts.append(f"[{i}]")
                raise

    return check


def _dict_checker(element: Checker) -> Checker:
    def check(value: Any) -> None:
        if type(value) is not dict:
            raise _Bad()
        for key, item in value.items():
            if not _is_unicode(key):
                raise _Bad(f"[{key}]")
            try:
                element(item)
            except _Bad as e:
                e.parts.append(f"[{key}]")
                raise

    return check


def _path(e: _Bad) -> str:
    path = "".join(reversed(e.parts)).lstrip(".")
    # A key holding a lone surrogate is shown as its escape, so the reply encodes.
    return path if _is_unicode(path) else path.encode("utf-8", "backslashreplace").decode()


class InterfaceValidator:
    """Checkers for the calls, replies and errors of one interface, compiled once.

    Thread-safe: checkers keep no state between calls.
    """

    __slots__ = ("_aliases", "_calls", "_errors", "_replies", "interface")

    def __init__(self, interface: Interface) -> None:
        self.interface = interface
        self._aliases: dict[str, Checker] = {}
        self._calls: dict[str, Checker] = {}
        self._replies: dict[str, Checker] = {}
        self._errors: dict[str, Checker] = {}
        for name, member in interface.members.items():
            if isinstance(member, _Method):
                self._calls[name] = self._compile(member.in_type)
                self._replies[name] = self._compile(member.out_type)
            elif isinstance(member, _Error):
                self._errors[name] = self._compile(member.type)

    def _compile(self, vtype: Any) -> Checker:
        # bool is an int subclass: test it first.
        if isinstance(vtype, bool):
            return _check_bool
        if isinstance(vtype, int):
            return _check_int
        if isinstance(vtype, float):
            return _check_float
        if isinstance(vtype, str):
            return _check_string
        if isinstance(vtype, _Maybe):
            return _maybe_checker(self._compile(vtype.element_type))
        if isinstance(vtype, _Array):
            return _array_checker(self._compile(vtype.element_type))
        if isinstance(vtype, _Dict):
            return _dict_checker(self._compile(vtype.element_type))
        if isinstance(vtype, (set, frozenset)):
            return _check_string_set
        if isinstance(vtype, _Object):
            return _check_object
        if isinstance(vtype, _Enum):
            return _enum_checker(frozenset(vtype.fields))
        if isinstance(vtype, _Struct):
            fields: dict[str, _Field] = {}
            for name, ftype in vtype.fields.items():
                fields[name] = _Field(self._compile(ftype), isinstance(ftype, _Maybe))
            return _struct_checker(fields)
        if isinstance(vtype, _CustomType):
            return self._alias(vtype.name)
        raise TypeError(f"{self.interface.name}: cannot check the type {vtype!r}")

    def _alias(self, name: str) -> Checker:
        checker = self._aliases.get(name)
        if checker is not None:
            return checker
        member = self.interface.members.get(name)
        if not isinstance(member, _Alias):
            raise TypeError(f"{self.interface.name}: unknown type {name!r}")
        # Register a forwarder first so that recursive types compile.
        target: list[Checker] = []

        def forward(value: Any) -> None:
            target[0](value)

        self._aliases[name] = forward
        compiled = self._compile(member.type)
        target.append(compiled)
        self._aliases[name] = compiled
        return compiled

    @staticmethod
    def _run(checker: Checker, parameters: Mapping[str, Any]) -> None:
        try:
            checker(parameters)
        except _Bad as e:
            raise InvalidParameter(_path(e)) from None

    def has_method(self, method: str) -> bool:
        return method in self._calls

    def input_fields(self, method: str) -> tuple[str, ...]:
        """``method``'s input field names in IDL order."""
        member = self.interface.members[method]
        return tuple(member.in_type.fields)

    def check_call(self, method: str, parameters: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidParameter` unless ``parameters`` fit ``method``'s input."""
        self._run(self._calls[method], parameters)

    def check_reply(self, method: str, parameters: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidParameter` unless ``parameters`` fit ``method``'s output."""
        self._run(self._replies[method], parameters)

    def check_error(self, error: str, parameters: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidParameter` unless ``parameters`` fit error ``error``
        (its short name); KeyError if the interface declares no such error."""
        self._run(self._errors[error], parameters)
