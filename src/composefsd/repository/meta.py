"""``meta.json``: the repository's format version, algorithm and feature flags.

The file is composefs-rs's ``RepoMetadata`` (reference notes, section 1.2), written
the way ``cfsctl init`` writes it (pretty-printed, two-space indent, a trailing
newline), so that either tool opens the other's repositories::

    {
      "version": 1,
      "algorithm": "fsverity-sha256-12",
      "features": {
        "compatible": [
          "composefsd-verity-try"
        ],
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
repository, an unknown *read-only-compatible* flag opens it read-only, unknown
*compatible* flags are ignored. ``v1_erofs`` (read-only-compatible) says the
default image format is V1, the C-compatible format every image of ours has.

How the verity policy is recorded
---------------------------------

composefs-rs has no JSON field for it: a repository is "secure" (fs-verity
required on every object) when ``meta.json`` itself has fs-verity, "insecure"
otherwise, and insecure repositories still enable verity where they can. We keep
that meaning and add one *compatible* flag, which composefs-rs ignores:

* ``required``: verity is enabled on ``meta.json`` (the composefs-rs way) and the
  flag ``composefsd-verity-required`` is set. Either one alone also means
  required, the stricter reading wins.
* ``try``: flag ``composefsd-verity-try``; also what a repository with neither
  flag nor verity on ``meta.json`` means (composefs-rs's insecure mode).
* ``disabled``: flag ``composefsd-verity-disabled``.

Two different policy flags are a corrupt ``meta.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from composefsd.kernel.verity import Algorithm
from composefsd.repository.errors import (
    CorruptRepositoryError,
    InvalidNameError,
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
    "RepoMetadata",
    "VerityPolicy",
    "parse_algorithm",
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


def _flag_list(features: dict[str, Any], key: str, where: str) -> list[str]:
    value = features.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CorruptRepositoryError(f"{where}: features.{key} is not a list of strings")
    return list(value)


@dataclass(slots=True)
class RepoMetadata:
    """A parsed ``meta.json``. Unknown top-level keys are kept in ``extra``."""

    algorithm: Algorithm
    version: int = REPO_FORMAT_VERSION
    compatible: list[str] = field(default_factory=list)
    read_only_compatible: list[str] = field(default_factory=list)
    incompatible: list[str] = field(default_factory=list)
    erofs_default: int | None = 1
    erofs_extra: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, algorithm: Algorithm, policy: VerityPolicy) -> RepoMetadata:
        """What ``init`` writes: V1 images by default, the policy as a compatible flag."""
        return cls(
            algorithm=algorithm,
            compatible=[f"composefsd-verity-{policy.value}"],
            read_only_compatible=[FEATURE_V1_EROFS],
        )

    @property
    def algorithm_name(self) -> str:
        return self.algorithm.composefs_rs_name

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
        """Raise :class:`UnsupportedRepositoryError` for what we cannot open at all."""
        if self.version > REPO_FORMAT_VERSION:
            raise UnsupportedRepositoryError(
                f"{where}: repository format version {self.version} is newer than this "
                f"composefsd supports ({REPO_FORMAT_VERSION})"
            )
        unknown = [f for f in self.incompatible if f not in KNOWN_INCOMPATIBLE]
        if unknown:
            raise UnsupportedRepositoryError(
                f"{where}: unknown incompatible feature flag(s): {', '.join(unknown)}"
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
        if self.erofs_default is not None:
            formats: dict[str, Any] = {"default": self.erofs_default}
            if self.erofs_extra:
                formats["extra"] = self.erofs_extra
            doc["erofs_formats"] = formats
        doc.update(self.extra)
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = META_JSON) -> RepoMetadata:
        """Parse and check ``meta.json``; ``where`` names it in errors.

        Raises :class:`CorruptRepositoryError` for a file that is not valid
        metadata, :class:`UnsupportedRepositoryError` for a newer version, an
        unknown algorithm or an unknown incompatible flag.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
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
        erofs_default: int | None = None
        erofs_extra: list[int] = []
        if formats is not None:
            if not isinstance(formats, dict) or not isinstance(formats.get("default"), int):
                raise CorruptRepositoryError(f"{where}: 'erofs_formats' has no integer 'default'")
            erofs_default = formats["default"]
            extra_formats = formats.get("extra", [])
            if not isinstance(extra_formats, list) or not all(
                isinstance(v, int) for v in extra_formats
            ):
                raise CorruptRepositoryError(f"{where}: 'erofs_formats.extra' is not a list")
            erofs_extra = list(extra_formats)
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
            erofs_default=erofs_default,
            erofs_extra=erofs_extra,
            extra=doc,
        )
        meta.check_supported(where)
        return meta
