"""``meta.json``: the repository's format version, algorithm, feature flags and
image formats.

The file is composefs-rs's ``RepoMetadata`` (reference notes, section 1.2), written
the way ``cfsctl init`` writes it (pretty-printed, two-space indent, a trailing
newline), so that either tool opens the other's repositories. A new repository
(verity policy ``try``) gets exactly what ``cfsctl init --insecure`` writes::

    {
      "version": 1,
      "algorithm": "fsverity-sha256-12",
      "features": {
        "compatible": [],
        "read-only-compatible": [
          "v1_erofs"
        ],
        "incompatible": []
      },
      "erofs_formats": {
        "default": 1
      }
    }

Feature flags follow the ext4 model: an unknown *incompatible* flag refuses the
repository (:class:`~composefsd.repository.errors.UnknownFeatureError`), an unknown
*read-only-compatible* flag opens it read-only, unknown *compatible* flags are
ignored.

Image formats
-------------

``erofs_formats`` is composefs-rs's ``FormatConfig``: the ``default`` format every
CreateImage writes (and names with its ref) and a set of ``extra`` formats written
beside it, unnamed. Versions are :class:`~composefsd.image.formats.ErofsVersion`
numbers (0, 1, 2). A repository without the field predates it: ``v1_erofs``
(read-only-compatible) then means V1, its absence V2, composefs-rs's original
format. As in composefs-rs the field wins when present, except that a field that
says exactly ``{"default": 2}`` is read like an absent one (``v1_erofs`` still
means V1 there). ``init`` writes the field and, for a V1 default, the ``v1_erofs``
flag, so that tools that predate the field open the repository read-only instead
of writing V2 images into it. V0 has no flag of its own.

How the verity policy is recorded
---------------------------------

composefs-rs has no JSON field for it: a repository is "secure" (fs-verity
required on every object) when ``meta.json`` itself has fs-verity, "insecure"
otherwise, and insecure repositories still enable verity where they can. We keep
that meaning and add one *compatible* flag, which composefs-rs ignores, where the
meaning differs from composefs-rs's:

* ``required``: verity is enabled on ``meta.json`` (the composefs-rs way) and the
  flag ``composefsd-verity-required`` is set. Either one alone also means
  required, the stricter reading wins.
* ``try``: neither flag nor verity on ``meta.json`` (composefs-rs's insecure mode,
  so the file is byte for byte ``cfsctl init --insecure``'s, and ``cfsctl init``
  finds its own configuration there). The flag ``composefsd-verity-try``, which
  older composefsd versions wrote, means the same.
* ``disabled``: flag ``composefsd-verity-disabled``.

Two different policy flags are a corrupt ``meta.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from composefsd.image.formats import ErofsVersion
from composefsd.kernel.verity import Algorithm
from composefsd.repository.errors import (
    CorruptRepositoryError,
    InvalidNameError,
    UnknownFeatureError,
    UnsupportedRepositoryError,
)
from composefsd.verity_policy import VerityPolicy

__all__ = [
    "FEATURE_V1_EROFS",
    "KNOWN_COMPATIBLE",
    "KNOWN_INCOMPATIBLE",
    "KNOWN_READ_ONLY_COMPATIBLE",
    "META_JSON",
    "POLICY_FLAGS",
    "REPO_FORMAT_VERSION",
    "FormatConfig",
    "RepoMetadata",
    "VerityPolicy",
    "parse_algorithm",
    "parse_erofs_version",
]

META_JSON = "meta.json"
#: composefs-rs ``REPO_FORMAT_VERSION``.
REPO_FORMAT_VERSION = 1
FEATURE_V1_EROFS = "v1_erofs"


POLICY_FLAGS: dict[str, VerityPolicy] = {
    f"composefsd-verity-{policy.value}": policy for policy in VerityPolicy
}
KNOWN_COMPATIBLE = frozenset(POLICY_FLAGS)
KNOWN_READ_ONLY_COMPATIBLE = frozenset({FEATURE_V1_EROFS})
KNOWN_INCOMPATIBLE: frozenset[str] = frozenset()


def parse_algorithm(value: str | Algorithm) -> Algorithm:
    """``fsverity-sha256-12`` / ``fsverity-sha512-12`` (also ``sha256``, ``sha512``)."""
    if isinstance(value, Algorithm):
        return value
    try:
        return Algorithm.parse(value)
    except ValueError as exc:
        raise InvalidNameError(
            f"unsupported algorithm {value!r}: expected fsverity-sha256-12 or fsverity-sha512-12"
        ) from exc


def parse_erofs_version(value: object) -> ErofsVersion:
    """An image format given by a caller (0, 1, 2, ``"1"``, ``"V1"``, an
    :class:`ErofsVersion`); :class:`InvalidNameError` for anything else."""
    if isinstance(value, ErofsVersion):
        return value
    text = value.strip().upper().removeprefix("V") if isinstance(value, str) else None
    # isdigit() alone admits digits int() refuses ("²").
    number = int(text) if text is not None and text.isascii() and text.isdigit() else value
    if isinstance(number, int) and not isinstance(number, bool):
        try:
            return ErofsVersion(number)
        except ValueError:
            pass
    raise InvalidNameError(f"unknown EROFS format version {value!r}: expected 0, 1 or 2")


@dataclass(slots=True, frozen=True)
class FormatConfig:
    """composefs-rs's ``FormatConfig``: the ``default`` format of the repository's
    images and the ``extra`` formats written beside each (sorted, no repeats; a
    repeat of ``default`` is kept, as composefs-rs keeps it, but not written twice)."""

    default: ErofsVersion = ErofsVersion.V1
    extra: tuple[ErofsVersion, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "default", ErofsVersion(self.default))
        object.__setattr__(self, "extra", tuple(sorted({ErofsVersion(v) for v in self.extra})))

    def versions(self) -> Iterator[ErofsVersion]:
        """The formats each image is written in: ``default`` first, then the extras."""
        yield self.default
        for version in self.extra:
            if version != self.default:
                yield version

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"default": int(self.default)}
        if self.extra:
            doc["extra"] = [int(v) for v in self.extra]
        return doc


def _flag_list(features: dict[str, Any], key: str, where: str) -> list[str]:
    value = features.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CorruptRepositoryError(f"{where}: features.{key} is not a list of strings")
    return list(value)


def _format_version(value: object, where: str) -> ErofsVersion:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CorruptRepositoryError(f"{where}: EROFS format version {value!r} is not an integer")
    try:
        return ErofsVersion(value)
    except ValueError:
        raise UnsupportedRepositoryError(
            f"{where}: unknown EROFS format version {value} in 'erofs_formats' "
            f"(this composefsd writes 0, 1 and 2)"
        ) from None


def _format_config(value: object, where: str) -> FormatConfig:
    if not isinstance(value, dict) or "default" not in value:
        raise CorruptRepositoryError(f"{where}: 'erofs_formats' has no 'default'")
    extra = value.get("extra", [])
    if not isinstance(extra, list):
        raise CorruptRepositoryError(f"{where}: 'erofs_formats.extra' is not a list")
    return FormatConfig(
        _format_version(value["default"], where),
        tuple(_format_version(v, where) for v in extra),
    )


@dataclass(slots=True)
class RepoMetadata:
    """A parsed ``meta.json``. Unknown top-level keys are kept in ``extra``;
    ``erofs_formats`` is None where the file has no such field."""

    algorithm: Algorithm
    version: int = REPO_FORMAT_VERSION
    compatible: list[str] = field(default_factory=list)
    read_only_compatible: list[str] = field(default_factory=list)
    incompatible: list[str] = field(default_factory=list)
    erofs_formats: FormatConfig | None = field(default_factory=FormatConfig)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        algorithm: Algorithm,
        policy: VerityPolicy,
        formats: FormatConfig | None = None,
    ) -> RepoMetadata:
        """What ``init`` writes (module notes): ``formats`` (default: V1 images) with
        ``v1_erofs`` for a V1 default, the policy as a compatible flag unless it is
        ``try``."""
        formats = formats or FormatConfig()
        return cls(
            algorithm=algorithm,
            compatible=[] if policy is VerityPolicy.TRY else [f"composefsd-verity-{policy.value}"],
            read_only_compatible=[FEATURE_V1_EROFS] if formats.default == ErofsVersion.V1 else [],
            erofs_formats=formats,
        )

    @property
    def algorithm_name(self) -> str:
        return self.algorithm.composefs_rs_name

    def format_config(self) -> FormatConfig:
        """The formats images are written in (module notes), as composefs-rs reads them."""
        legacy = FormatConfig(ErofsVersion.V2)
        if self.erofs_formats is not None and self.erofs_formats != legacy:
            return self.erofs_formats
        if FEATURE_V1_EROFS in self.read_only_compatible:
            return FormatConfig(ErofsVersion.V1)
        return legacy

    @property
    def erofs_version(self) -> ErofsVersion:
        """The default image format."""
        return self.format_config().default

    @property
    def policy_flag(self) -> VerityPolicy | None:
        """The policy recorded by our compatible flag, if any."""
        found = {POLICY_FLAGS[f] for f in self.compatible if f in POLICY_FLAGS}
        if len(found) > 1:
            names = ", ".join(sorted(f for f in self.compatible if f in POLICY_FLAGS))
            raise CorruptRepositoryError(f"meta.json has conflicting verity policy flags: {names}")
        return found.pop() if found else None

    def policy(self, meta_has_verity: bool) -> VerityPolicy:
        """The effective policy (module notes): verity on meta.json means required."""
        flag = self.policy_flag
        if meta_has_verity or flag is VerityPolicy.REQUIRED:
            return VerityPolicy.REQUIRED
        return flag or VerityPolicy.TRY

    def unknown_read_only_compatible(self) -> list[str]:
        return [f for f in self.read_only_compatible if f not in KNOWN_READ_ONLY_COMPATIBLE]

    def check_supported(self, where: str) -> None:
        """Raise :class:`UnsupportedRepositoryError` for what we cannot open at all
        (:class:`UnknownFeatureError` for unknown incompatible feature flags)."""
        if self.version > REPO_FORMAT_VERSION:
            raise UnsupportedRepositoryError(
                f"{where}: repository format version {self.version} is newer than this "
                f"composefsd supports ({REPO_FORMAT_VERSION})"
            )
        unknown = [f for f in self.incompatible if f not in KNOWN_INCOMPATIBLE]
        if unknown:
            raise UnknownFeatureError(
                f"{where}: the repository requires unknown incompatible feature(s): "
                f"{', '.join(unknown)}; this composefsd cannot open it",
                features=unknown,
            )
        self.policy_flag  # noqa: B018 -- raises on conflicting flags

    def to_json(self) -> bytes:
        """The composefs-rs serialisation, byte for byte (serde_json's pretty printer)."""
        doc: dict[str, Any] = {
            "version": self.version,
            "algorithm": self.algorithm_name,
            "features": {
                "compatible": self.compatible,
                "read-only-compatible": self.read_only_compatible,
                "incompatible": self.incompatible,
            },
        }
        if self.erofs_formats is not None:
            doc["erofs_formats"] = self.erofs_formats.to_doc()
        doc.update(self.extra)
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = META_JSON) -> RepoMetadata:
        """Parse and check ``meta.json``; ``where`` names it in errors.

        Raises :class:`CorruptRepositoryError` for a file that is not valid
        metadata, :class:`UnsupportedRepositoryError` for a newer version, an
        unknown algorithm or image format, and :class:`UnknownFeatureError` for
        an unknown incompatible flag.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptRepositoryError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise CorruptRepositoryError(f"{where} is not a JSON object")
        doc = dict(doc)
        version = doc.pop("version", None)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptRepositoryError(f"{where}: 'version' is not a positive integer")
        algorithm = doc.pop("algorithm", None)
        if not isinstance(algorithm, str):
            raise CorruptRepositoryError(f"{where}: 'algorithm' is missing or not a string")
        features = doc.pop("features", {})
        if not isinstance(features, dict):
            raise CorruptRepositoryError(f"{where}: 'features' is not an object")
        formats = doc.pop("erofs_formats", None)
        compatible = _flag_list(features, "compatible", where)
        ro_compatible = _flag_list(features, "read-only-compatible", where)
        incompatible = _flag_list(features, "incompatible", where)
        if version > REPO_FORMAT_VERSION:
            # Say so before anything else of a newer format can confuse us.
            raise UnsupportedRepositoryError(
                f"{where}: repository format version {version} is newer than this "
                f"composefsd supports ({REPO_FORMAT_VERSION})"
            )
        try:
            alg = Algorithm.parse(algorithm)
            if not algorithm.startswith("fsverity-"):
                raise ValueError(algorithm)
        except ValueError as exc:
            raise UnsupportedRepositoryError(
                f"{where}: unsupported algorithm {algorithm!r} "
                f"(supported: fsverity-sha256-12, fsverity-sha512-12)"
            ) from exc
        meta = cls(
            algorithm=alg,
            version=version,
            compatible=compatible,
            read_only_compatible=ro_compatible,
            incompatible=incompatible,
            erofs_formats=None,
            extra=doc,
        )
        # Unknown incompatible features first: they may be what changes the formats.
        meta.check_supported(where)
        if formats is not None:
            meta.erofs_formats = _format_config(formats, where)
        return meta
