"""The tar reader's fast paths give what the general rules give.

The reader parses octal fields, header checksums and entry names on a fast path
for the common case and falls back to the general code otherwise; these tests
hold both to an independent reference (the rules written out plainly, and
Python's tarfile as the writer), including the inputs where a careless fast path
would accept what the general rule refuses.
"""

from __future__ import annotations

import io
import itertools
import subprocess
import tarfile

import pytest

from layerdb.engine.errors import LayerFormatError
from layerdb.engine.tarevents import MAX_DEPTH, normalize
from layerdb.engine.tarstream import BLOCK, TarReader, _number


def _reference_normalize(name: bytes):
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if b".." in parts or len(parts) > MAX_DEPTH:
        return "refused"
    return b"/".join(parts)


def test_normalize_equals_the_rule_on_every_short_name():
    pieces = [b"a", b".", b"..", b"/", b".b", b"b.", b".wh.", b"./"]
    n = 0
    for k in range(1, 6):
        for combo in itertools.product(pieces, repeat=k):
            name = b"".join(combo)
            try:
                got = normalize(name)
            except LayerFormatError:
                got = "refused"
            assert got == _reference_normalize(name), name
            n += 1
    assert n > 30_000


def test_normalize_depth_limit_on_both_paths():
    deep = b"/".join([b"d"] * MAX_DEPTH)
    assert normalize(deep) == deep
    with pytest.raises(LayerFormatError, match="components"):
        normalize(deep + b"/x")
    with pytest.raises(LayerFormatError, match="components"):
        normalize(b"./" + deep + b"/x")


def _reference_number(field: bytes) -> int | str:
    if field and field[0] & 0x80:
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else n
    s = field.split(b"\0", 1)[0].strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        return "refused"


@pytest.mark.parametrize("field", [
    b"0000644\0", b"0000644 ", b" 644 \0\0", b"\0\0\0\0\0\0\0\0", b"        ", b"", b"7777777\0",
    b"00000000000\0", b"12345670123\0", b"0000x44\0", b"0009\0", b"- 1\0", b"\x80\0\0\0\0\0\0\x05",
    b"\xff\xff\xff\xff\xff\xff\xff\xfe", b"644\0garbage", b"+17\0",
])
def test_octal_fields_equal_the_rule(field):
    try:
        got = _number(field, "mode")
    except LayerFormatError:
        got = "refused"
    assert got == _reference_number(field)


def _one_file_tar(name: str, **attrs) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo(name)
        info.size = 3
        for k, v in attrs.items():
            setattr(info, k, v)
        t.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


def _entries(data: bytes):
    r = TarReader(io.BytesIO(data))
    out = []
    for e in r:
        out.append((e.name, e.type, e.mode, e.uid, e.gid, e.mtime, e.size, e.linkname, b"".join(r.payload())))
    return out


def test_headers_with_large_byte_sums_parse():
    # A long ustar name (prefix + name) of bytes above 127: the header's byte
    # sum passes adler32's modulus, so only the exact sum can check it.
    name = ("\udcff" * 40 + "/") * 3 + "\udcff" * 90  # raw 0xFF bytes (surrogateescape)
    data = _one_file_tar(name, uname="\udcff" * 31, gname="\udcff" * 31, mode=0o7777, uid=0o7777777,
                         gid=0o7777777, mtime=0o77777777777)
    assert sum(data[:BLOCK]) > 65521
    [(got_name, typ, mode, uid, gid, mtime, size, _, payload)] = _entries(data)
    assert got_name == name.encode("utf-8", "surrogateescape")
    assert (typ, mode, uid, gid, mtime, size, payload) == ("f", 0o7777, 0o7777777, 0o7777777, 0o77777777777, 3, b"abc")


def _with_checksum(data: bytes, value: int) -> bytes:
    hdr = bytearray(data[:BLOCK])
    hdr[148:156] = b"%06o\0 " % value
    return bytes(hdr) + data[BLOCK:]


@pytest.mark.parametrize("high", [False, True])
def test_a_checksum_off_by_adlers_modulus_is_refused(high):
    name = ("\udcff" * 40 + "/") * 3 + "\udcff" * 90 if high else "etc/hostname"
    data = _one_file_tar(name, uname="\udcff" * 31, gname="\udcff" * 31) if high else _one_file_tar(name)
    hdr = data[:BLOCK]
    true_sum = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    assert _entries(_with_checksum(data, true_sum))  # the right sum, written our way, parses
    wrong = true_sum - 65521 if true_sum > 65521 else true_sum + 65521
    with pytest.raises(LayerFormatError, match="checksum"):
        _entries(_with_checksum(data, wrong))
    with pytest.raises(LayerFormatError, match="checksum"):
        _entries(_with_checksum(data, true_sum + 1))


def test_gnu_tar_archive_with_every_field_form(tmp_path):
    # GNU tar writes base-256 for values octal cannot hold and PAX records for
    # long names; the reader's fast path must hand those to the general code.
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"abc")
    long_name = "n" * 150
    (root / long_name).write_bytes(b"xyz")
    out = tmp_path / "a.tar"
    subprocess.run(["tar", "--format=gnu", "--owner=0", "--group=0", "--mtime=@8589934600",
                    "-C", str(root), "-cf", str(out), "d", long_name], check=True)
    got = {normalize(e[0]): e for e in _entries(out.read_bytes())}
    assert got[b"d/f"][5] == 8589934600  # past 8**11: base-256
    assert got[b"d/f"][8] == b"abc"
    assert got[long_name.encode()][8] == b"xyz"
    with tarfile.open(out) as t:
        want = {m.name.rstrip("/").encode(): (m.mode, m.uid, m.gid, m.mtime) for m in t.getmembers()}
    assert {k: (e[2], e[3], e[4], e[5]) for k, e in got.items()} == want
