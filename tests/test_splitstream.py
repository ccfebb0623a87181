"""composefs-rs splitstreams (composefsd.splitstream) against cfsctl's golden streams,
and hostile variants of them."""

from __future__ import annotations

import json
import struct
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import zstandard

from composefsd import splitstream as ss
from conftest import SHARED

RS = SHARED / "testdata" / "composefs-rs"
EXPECTED = RS / "expected"


@cache
def golden_streams() -> tuple[tuple[str, dict[str, Any], bytes], ...]:
    """(label, decoded entry of a streams.json, raw bytes) of every recorded splitstream:
    the raw files beside the OCI pulls' streams.json and the streams inside the repo tars."""
    out: list[tuple[str, dict[str, Any], bytes]] = []
    for listing in sorted(EXPECTED.glob("oci/*/streams*/streams.json")):
        for content_id, entry in json.loads(listing.read_text()).items():
            raw = (listing.parent / entry["raw_file"]).read_bytes()
            out.append((f"{listing.parent.relative_to(EXPECTED)}/{content_id}", entry, raw))
    for alg in ("sha256", "sha512"):
        decoded = json.loads(
            (EXPECTED / "repos" / f"repo-{alg}.streams" / "streams.json").read_text()
        )
        with tarfile.open(RS / "repos" / f"repo-{alg}.tar.gz") as tar:
            for content_id, entry in decoded.items():
                rel = entry["symlink_target"].removeprefix("../")
                member = tar.extractfile(f"repo-{alg}/{rel}")
                assert member is not None
                out.append((f"repo-{alg}/{content_id}", entry, member.read()))
    return tuple(out)


def digest_size(entry: dict[str, Any]) -> int:
    return 32 if entry["header"]["algorithm"] == 1 else 64


def test_golden_streams_are_there() -> None:
    streams = golden_streams()
    assert len(streams) >= 100
    kinds = {e["info"]["content_type"] for _, e, _ in streams}
    assert kinds == {
        ss.CONTENT_TYPE_OCI_LAYER,
        ss.CONTENT_TYPE_OCI_CONFIG,
        ss.CONTENT_TYPE_OCI_MANIFEST,
    }


def test_content_types_spell_composefs_rs_names() -> None:
    assert ss.CONTENT_TYPE_OCI_LAYER.to_bytes(8, "little") == b"ocilayer"
    assert ss.CONTENT_TYPE_OCI_CONFIG.to_bytes(8, "little") == b"ociconfg"
    assert ss.CONTENT_TYPE_OCI_MANIFEST.to_bytes(8, "little") == b"ocimanif"


def test_every_golden_stream_reads_as_decoded() -> None:
    for label, entry, raw in golden_streams():
        refs = ss.read_refs(raw, digest_size(entry))
        assert refs.content_type == entry["info"]["content_type"], label
        assert list(refs.stream_refs) == entry["stream_refs"], label
        assert list(refs.object_refs) == entry["object_refs"], label
        assert list(refs.named_refs) == [(n["name"], n["id"]) for n in entry["named_refs"]], label
        parsed = ss.parse(memoryview(raw), digest_size(entry))
        assert parsed.stream_size == entry["info"]["stream_size"], label
        assert [parsed.stream_start, parsed.stream_end] == entry["info"]["stream"], label
        assert not parsed.old_header


def _config_stream() -> tuple[dict[str, Any], bytes]:
    """A golden stream with stream refs, object refs and several named refs."""
    for _label, entry, raw in golden_streams():
        if (
            entry["info"]["content_type"] == ss.CONTENT_TYPE_OCI_CONFIG
            and len(entry["named_refs"]) >= 3
        ):
            return entry, raw
    raise AssertionError("no config stream with three named refs")


def test_every_truncation_before_the_stream_section_is_refused() -> None:
    entry, raw = _config_stream()
    start = entry["info"]["stream"][0]
    for length in range(start):
        with pytest.raises(ss.SplitStreamError):
            ss.read_refs(raw[:length], digest_size(entry))


def test_old_header_layout_is_read() -> None:
    # bootc <= 1.15 wrote the header fields in Rust's reordered layout: info range
    # first, flags, then the magic at byte 18.
    entry, raw = _config_stream()
    magic, version, flags, alg, lg, start, end = struct.unpack_from("<11sBHBBQQ", raw)
    old = struct.pack("<QQH11sBBB", start, end, flags, magic, version, alg, lg) + raw[32:]
    parsed = ss.parse(old, digest_size(entry))
    assert parsed.old_header
    assert parsed.refs == ss.read_refs(raw, digest_size(entry))


def _patched(raw: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _info_field(entry: dict[str, Any], index: int) -> int:
    return int(entry["header"]["info_range"][0]) + 8 * index


def test_bad_headers_are_refused() -> None:
    entry, raw = _config_stream()
    size = digest_size(entry)
    cases = {
        "magic": b"Splitstream" + raw[11:],
        "version": _patched(raw, 11, "<B", 1),
        "algorithm": _patched(raw, 14, "<B", 2 if size == 32 else 1),
        "block size": _patched(raw, 15, "<B", 16),
        "info past end": _patched(raw, 16, "<QQ", 32, len(raw) + 1),
        "info negative": _patched(raw, 16, "<QQ", 112, 32),
        "info short": _patched(raw, 16, "<QQ", 32, 32 + 79),
        "info huge": _patched(raw, 16, "<QQ", 32, 2**64 - 1),
    }
    for what, data in cases.items():
        with pytest.raises(ss.SplitStreamError):
            ss.read_refs(data, size)
        assert what


def test_wrong_algorithm_for_the_repository_is_refused() -> None:
    entry, raw = _config_stream()
    other = 64 if digest_size(entry) == 32 else 32
    with pytest.raises(ss.SplitStreamError, match="algorithm"):
        ss.read_refs(raw, other)


def test_bad_ranges_are_refused() -> None:
    entry, raw = _config_stream()
    size = digest_size(entry)
    _sr_start, sr_end = entry["info"]["stream_refs"]
    _nr_start, nr_end = entry["info"]["named_refs"]
    _s_start, s_end = entry["info"]["stream"]
    cases: list[tuple[int, str, tuple[int, ...]]] = [
        # stream refs not a whole number of digests
        (_info_field(entry, 1), "<Q", (sr_end - 1,)),
        # object refs reaching past the end
        (_info_field(entry, 3), "<Q", (len(raw) + size,)),
        # negative ranges
        (_info_field(entry, 0), "<Q", (sr_end + 1,)),
        (_info_field(entry, 4), "<Q", (s_end + 1,)),
        # named refs cut short: a truncated zstd frame
        (_info_field(entry, 7), "<Q", (nr_end - 1,)),
        # named refs past the end, at a huge offset
        (_info_field(entry, 6), "<QQ", (2**63, 2**63 + 16)),
    ]
    for offset, fmt, values in cases:
        with pytest.raises(ss.SplitStreamError):
            ss.read_refs(_patched(raw, offset, fmt, *values), size)
    # Empty ranges are accepted wherever they point, as composefs-rs does.
    empty = _patched(raw, _info_field(entry, 2), "<QQ", 2**63, 2**63)
    assert ss.read_refs(empty, size).object_refs == ()


def _with_named_refs(entry: dict[str, Any], raw: bytes, records: bytes) -> bytes:
    """``raw`` with its named-refs section replaced by ``records`` compressed (appended
    at the end of the file, where composefs-rs allows any section to be)."""
    section = zstandard.ZstdCompressor(level=3).compress(records)
    start = len(raw)
    return _patched(raw, _info_field(entry, 6), "<QQ", start, start + len(section)) + section


def test_named_refs_records_are_checked() -> None:
    entry, raw = _config_stream()
    size = digest_size(entry)
    count = len(entry["stream_refs"])
    first = entry["stream_refs"][0]
    good = {
        b"": (),
        b"0:a\0": (("a", first),),
        b"+0:a\0": (("a", first),),  # Rust's usize parse takes a plus sign
        b"00:a:b\0": (("a:b", first),),  # the name is everything after the first colon
        b"0:\0": (("", first),),
        # a later record of the same name wins, as in composefs-rs's map
        b"0:a\x001:b\x00" + f"{count - 1}:a\0".encode(): (
            ("a", entry["stream_refs"][count - 1]),
            ("b", entry["stream_refs"][1]),
        ),
    }
    for records, expected in good.items():
        assert ss.read_refs(_with_named_refs(entry, raw, records), size).named_refs == expected
    bad = [
        b"0:a",  # no terminator
        b"0:a\0junk",
        b"a\0",  # no colon
        b":a\0",
        b"-1:a\0",
        b" 1:a\0",
        b"1e3:a\0",
        b"\xd9\xa0:a\0",  # a non-ASCII digit
        f"{count}:a\0".encode(),
        f"{2**64}:a\0".encode(),
        b"0:\xff\0",  # not UTF-8
    ]
    for records in bad:
        with pytest.raises(ss.SplitStreamError):
            ss.read_refs(_with_named_refs(entry, raw, records), size)


def test_named_refs_that_are_not_zstd_or_too_large_are_refused() -> None:
    entry, raw = _config_stream()
    size = digest_size(entry)
    nr_start, nr_end = entry["info"]["named_refs"]
    section = raw[nr_start:nr_end]
    garbage = [
        section + b"\0",  # a stray byte after the frame
        section + section[:6],  # a second frame, truncated
        b"\0" * 8,
        bytes([0x28, 0xB5, 0x2F, 0xFD, 0x08]),  # reserved bit
    ]
    for data in garbage:
        start = len(raw)
        patched = _patched(raw, _info_field(entry, 6), "<QQ", start, start + len(data)) + data
        with pytest.raises(ss.SplitStreamError):
            ss.read_refs(patched, size)
    # Two whole frames are read as one section, as the zstd crate's decoder does.
    doubled = section + zstandard.ZstdCompressor().compress(b"0:extra\0")
    start = len(raw)
    patched = _patched(raw, _info_field(entry, 6), "<QQ", start, start + len(doubled)) + doubled
    assert ("extra", entry["stream_refs"][0]) in ss.read_refs(patched, size).named_refs
    # A small frame that expands past the limit is refused, not decompressed.
    bomb = zstandard.ZstdCompressor(level=19).compress(b"x" * (ss.NAMED_REFS_MAX + 1))
    assert len(bomb) < 4096
    start = len(raw)
    patched = _patched(raw, _info_field(entry, 6), "<QQ", start, start + len(bomb)) + bomb
    with pytest.raises(ss.SplitStreamError, match="more than"):
        ss.read_refs(patched, size)


def test_every_byte_flip_is_refused_or_read() -> None:
    """Garbling any single byte before the stream section never crashes: either the
    stream still reads, or SplitStreamError."""
    entry, raw = _config_stream()
    for offset in range(entry["info"]["stream"][0]):
        data = bytearray(raw)
        data[offset] ^= 0xFF
        try:
            ss.read_refs(bytes(data), digest_size(entry))
        except ss.SplitStreamError:
            pass


def test_read_refs_takes_mmap(tmp_path: Path) -> None:
    import mmap

    entry, raw = _config_stream()
    path = tmp_path / "s"
    path.write_bytes(raw)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        refs = ss.read_refs(mapped, digest_size(entry))
    assert list(refs.object_refs) == entry["object_refs"]
