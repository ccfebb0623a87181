"""composefs-rs splitstreams (composefsd.splitstream) against cfsctl's golden streams,
and hostile variants of them."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from composefsd import splitstream as ss
from rsgolden import ALGORITHMS, EXPECTED, RS, read_json, repo_tar


@cache
def golden_streams() -> tuple[tuple[str, dict[str, Any], bytes], ...]:
    """(label, decoded entry of a streams.json, raw bytes) of every recorded splitstream:
    the raw files beside the OCI pulls' streams.json and the streams inside the repo tars."""
    out: list[tuple[str, dict[str, Any], bytes]] = []
    for listing in sorted(EXPECTED.glob("oci/*/streams*/streams.json")):
        for content_id, entry in read_json(str(listing.relative_to(RS))).items():
            raw = (listing.parent / entry["raw_file"]).read_bytes()
            out.append((f"{listing.parent.relative_to(EXPECTED)}/{content_id}", entry, raw))
    for alg in ALGORITHMS:
        decoded = read_json(f"expected/repos/repo-{alg}.streams/streams.json")
        with tarfile.open(repo_tar(alg)) as tar:
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
    section = ss.zstd_compress(records)
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
    doubled = section + ss.zstd_compress(b"0:extra\0")
    start = len(raw)
    patched = _patched(raw, _info_field(entry, 6), "<QQ", start, start + len(doubled)) + doubled
    assert ("extra", entry["stream_refs"][0]) in ss.read_refs(patched, size).named_refs
    # A small frame that expands past the limit is refused, not decompressed.
    bomb = ss.zstd_compress(b"x" * (ss.NAMED_REFS_MAX + 1))
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


# --- the stream section and the writer ---------------------------------------------


@cache
def object_sizes() -> dict[str, int]:
    """Sizes of the objects in the golden repositories (every object a golden stream
    references is among them): the writer needs them for ``stream_size``."""
    sizes: dict[str, int] = {}
    for alg in ALGORITHMS:
        with tarfile.open(repo_tar(alg)) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if member.isfile() and len(parts) == 4 and parts[1] == "objects":
                    sizes[parts[2] + parts[3]] = member.size
    return sizes


def decoded_chunks(raw: bytes, size: int) -> list[dict[str, Any]]:
    """The chunks of ``raw`` in streams.json's form (inline pieces joined)."""
    out: list[dict[str, Any]] = []
    inline = b""
    for chunk in ss.iter_chunks(raw, ss.parse(raw, size)):
        if isinstance(chunk, bytes):
            inline += chunk
            continue
        if inline:
            out.append({"inline": len(inline), "sha256": hashlib.sha256(inline).hexdigest()})
            inline = b""
        out.append({"external": chunk.index, "object": chunk.digest})
    if inline:
        out.append({"inline": len(inline), "sha256": hashlib.sha256(inline).hexdigest()})
    return out


def test_every_golden_stream_has_the_decoded_chunks() -> None:
    for label, entry, raw in golden_streams():
        assert decoded_chunks(raw, digest_size(entry)) == entry["chunks"], label


def reencode(raw: bytes, size: int) -> bytes:
    parsed = ss.parse(raw, size)
    sizes = object_sizes()
    chunks: list[bytes | tuple[str, int]] = [
        (c.digest, sizes[c.digest]) if isinstance(c, ss.ObjectChunk) else c
        for c in ss.iter_chunks(raw, parsed)
    ]
    return ss.write_splitstream(
        size,
        parsed.refs.content_type,
        chunks,
        named_refs=parsed.refs.named_refs,
        stream_refs=parsed.refs.stream_refs,
    )


def test_every_golden_stream_reencodes() -> None:
    """Byte for byte where our libzstd is the one that wrote the golden data (1.5.4,
    Debian 12's, which run-tests builds the binding against); with another libzstd
    the compressed sections may differ, so there the decoded parts are compared."""
    same_zstd = ss.zstd_version_info()[:3] == (1, 5, 4)
    for label, entry, raw in golden_streams():
        size = digest_size(entry)
        out = reencode(raw, size)
        if same_zstd:
            assert out == raw, label
        else:
            assert ss.parse(out, size).refs == ss.parse(raw, size).refs, label
            assert decoded_chunks(out, size) == entry["chunks"], label
        assert ss.parse(out, size).stream_size == entry["info"]["stream_size"], label


def test_ci_builds_against_the_golden_libzstd() -> None:
    """run-tests builds the binding against the system libzstd, Debian 12's 1.5.4,
    so that the byte-for-byte re-encoding above runs in CI."""
    if os.environ.get("CI"):
        assert ss.zstd_version_info()[:3] == (1, 5, 4)


def test_writer_output_parses_back() -> None:
    digest_a, digest_b, digest_c = ("a" * 64, "b" * 64, "c" * 64)
    writer = ss.SplitStreamWriter(32, ss.CONTENT_TYPE_OCI_CONFIG)
    writer.add_named_ref("zeta", digest_b)
    writer.add_named_ref("alpha:with:colons", digest_a)
    writer.add_named_ref("zeta", digest_c)  # re-pointed: b stays in the stream refs
    writer.write_inline(b"head")
    writer.write_inline(b"er")
    writer.write_object(digest_a, 100)
    writer.write_object(digest_b, 7)
    writer.write_object(digest_a, 100)
    writer.write_inline(b"x" * 3_000_000)
    data = writer.finish()
    parsed = ss.parse(data, 32)
    assert parsed.refs.stream_refs == (digest_b, digest_a, digest_c)
    assert parsed.refs.named_refs == (("alpha:with:colons", digest_a), ("zeta", digest_c))
    assert parsed.refs.object_refs == (digest_a, digest_b)
    assert parsed.stream_size == 6 + 207 + 3_000_000
    chunks = list(ss.iter_chunks(data, parsed))
    assert chunks[0] == b"header"
    assert chunks[1:4] == [
        ss.ObjectChunk(0, digest_a),
        ss.ObjectChunk(1, digest_b),
        ss.ObjectChunk(0, digest_a),
    ]
    assert b"".join(c for c in chunks[4:] if isinstance(c, bytes)) == b"x" * 3_000_000
    assert all(len(c) <= 1 << 20 for c in chunks if isinstance(c, bytes))
    # An empty stream, as composefs-rs writes one (its zstd frame declares size 0).
    empty = ss.write_splitstream(64, ss.CONTENT_TYPE_OCI_LAYER, [])
    assert list(ss.iter_chunks(empty, ss.parse(empty, 64))) == []


def test_writer_refuses_bad_input() -> None:
    writer = ss.SplitStreamWriter(32, 0)
    for bad in ("A" * 64, "a" * 63, "a" * 128, "g" * 64, ""):
        with pytest.raises(ValueError):
            writer.write_object(bad, 1)
        with pytest.raises(ValueError):
            writer.add_named_ref("n", bad)
    with pytest.raises(ValueError):
        writer.add_named_ref("a\0b", "a" * 64)
    with pytest.raises(ValueError):
        ss.SplitStreamWriter(20, 0)


def _layer_stream() -> tuple[dict[str, Any], bytes]:
    for _label, entry, raw in golden_streams():
        if entry["info"]["content_type"] == ss.CONTENT_TYPE_OCI_LAYER and len(entry["chunks"]) > 8:
            return entry, raw
    raise AssertionError("no layer stream with chunks")


def _read_all(data: bytes, size: int) -> None:
    list(ss.iter_chunks(data, ss.parse(data, size)))


def test_every_truncation_of_a_layer_stream_is_refused() -> None:
    entry, raw = _layer_stream()
    for length in range(len(raw)):
        with pytest.raises(ss.SplitStreamError):
            _read_all(raw[:length], digest_size(entry))


def _with_stream(size: int, decompressed: bytes, stream_size: int, objects: int = 1) -> bytes:
    """A splitstream with ``objects`` object refs and the given stream section."""
    base = ss.write_splitstream(size, 0, [("d" * (2 * size), 1)] if objects else [])
    section = ss.zstd_compress(decompressed)
    start = len(base)
    out = bytearray(base + section)
    struct.pack_into("<QQ", out, 32 + 32, start, start + len(section))
    struct.pack_into("<Q", out, 32 + 72, stream_size)
    return bytes(out)


def test_hostile_stream_sections_are_refused() -> None:
    q = struct.Struct("<q").pack
    cases = {
        "object index past the refs": (q(1), 10),
        "negative huge inline": (q(-(2**63)), 10),
        "inline beyond stream_size": (q(-11) + b"x" * 11, 10),
        "inline cut short": (q(-5) + b"abc", 10),
        "header cut short": (q(0) + b"\0\0\0", 10),
        "more than the limit": (q(0) * 10, 0),
    }
    for what, (section, declared) in cases.items():
        with pytest.raises(ss.SplitStreamError):
            _read_all(_with_stream(32, section, declared), 32)
        assert what
    # Within bounds these read.
    _read_all(_with_stream(32, q(-5) + b"abcde" + q(0), 6), 32)


def test_a_zstd_bomb_in_the_stream_section_is_stopped_early() -> None:
    """A small section that would decompress to a gigabyte of zero headers (object 0,
    over and over) is refused once it passes what stream_size allows."""
    bomb = ss.zstd_compress(bytes(64 << 20))
    assert len(bomb) < 8192
    data = _with_stream(32, b"", 1000)
    start = len(data)
    patched = bytearray(data + bomb)
    struct.pack_into("<QQ", patched, 32 + 32, start, start + len(bomb))
    chunks = 0
    with pytest.raises(ss.SplitStreamError, match="more than"):
        for _chunk in ss.iter_chunks(bytes(patched), ss.parse(bytes(patched), 32)):
            chunks += 1
    assert chunks <= 9 * 1000 // 8 + 1


_ZSTD_MODULES = ("backports.zstd", "compression.zstd")


def test_zstd_is_loaded_only_to_compress_or_decompress() -> None:
    """Importing the repository, the daemon and composefsctl (and running its --help)
    leaves the zstd extension unloaded; the first section compressed loads it."""
    code = (
        "import contextlib, io, json, sys\n"
        "import composefsd.repository, composefsd.service.daemon\n"
        "from composefsd.cli.composefsctl import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        f"names = {_ZSTD_MODULES!r}\n"
        "before = [m for m in names if m in sys.modules]\n"
        "from composefsd import splitstream\n"
        "splitstream.zstd_compress(b'x')\n"
        "after = [m for m in names if m in sys.modules]\n"
        "print(json.dumps([before, after]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    before, after = json.loads(out)
    assert before == []
    assert len(after) == 1
