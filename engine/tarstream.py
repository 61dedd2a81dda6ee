"""A streaming tar reader that keeps every byte.

Python's tarfile hides the raw header blocks, and a lossless store needs them:
a layer tar must be rebuilt byte for byte (its sha256 is the diff_id).  This
reader splits the stream into two parts:

- payloads of regular files, handed to the caller in bounded pieces, and
- framing: everything else (header blocks, PAX and GNU extension records,
  padding, non-file payloads, end-of-archive blocks and trailing bytes).

Concatenating, for each entry, its ``framing`` and then its payload, and at the
end ``TarReader.trailer``, gives back the input exactly.

It sits in the foundation because two rooms read tars with it: ingest (import)
and upkeep (fsck --deep parses every rebuilt layer tar as import did).
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from .errors import LayerFormatError

BLOCK = 512
READ_SIZE = 1 << 20
# Extension records (PAX, GNU long names) are read into memory whole: bound them.
MAX_EXTENSION = 1 << 20
# Bytes after the end-of-archive marker are kept for the rebuild; writers pad to
# a record (10 KiB for GNU tar).  Anything much larger is not a tar.
MAX_TRAILER = 16 << 20

ZERO_BLOCK = bytes(BLOCK)
_CHKSUM_SPACES = b" " * 8
# A header with at least this many NUL bytes has at most 256 others (its
# checksum field counted as spaces), so its byte sum is at most 65280, below
# adler32's modulus: the sum adler32 gives is then exact.
_ADLER_EXACT_NULS = BLOCK - 256 + 8

REGULAR = (b"0", b"\0", b"7")
TYPES = {b"0": "f", b"\0": "f", b"7": "f", b"1": "h", b"2": "l", b"3": "c", b"4": "b", b"5": "d", b"6": "p"}


@dataclass
class TarEntry:
    name: bytes  # raw name as the archive gives it (PAX/GNU long names applied)
    type: str  # f h l c b d p
    mode: int
    uid: int
    gid: int
    size: int  # payload bytes that follow (regular files only; others are 0)
    mtime: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    framing: bytes = b""  # raw bytes before the payload, since the previous payload


def _nul_terminated(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _fits(n: int, what: str) -> int:
    # Sizes, ids and times are SQLite integers: 64-bit signed.
    if not -(1 << 63) <= n < 1 << 63:
        raise LayerFormatError(f"tar: {what} {n} does not fit in 64 bits")
    return n


def _number(field_: bytes, what: str) -> int:
    # The common case, one C call: octal digits, maybe space-padded, NUL-terminated.
    if field_ and not field_[0] & 0x80:
        try:
            return int(field_.partition(b"\0")[0], 8)
        except ValueError:
            pass
    return _number_slow(field_, what)


def _number_slow(field_: bytes, what: str) -> int:
    if field_ and field_[0] & 0x80:  # GNU base-256
        n = int.from_bytes(field_[1:], "big")
        if field_[0] == 0xFF:
            n -= 1 << (8 * (len(field_) - 1))
        return _fits(n, what)
    s = _nul_terminated(field_).strip(b" \0")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise LayerFormatError(f"tar header: bad {what} field {field_!r}") from None


def _parse_pax(data: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # padding NULs at the end of the record block
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise LayerFormatError("tar: malformed PAX record")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise LayerFormatError("tar: malformed PAX record length") from None
        if length <= sp - pos or pos + length > len(data):
            raise LayerFormatError("tar: PAX record length out of range")
        rec = data[sp + 1 : pos + length]
        if not rec.endswith(b"\n") or b"=" not in rec:
            raise LayerFormatError("tar: malformed PAX record")
        k, v = rec[:-1].split(b"=", 1)
        out[k.decode("utf-8", "surrogateescape")] = v
        pos += length
    return out


class TarReader:
    """Iterate over the entries of a tar stream.

    ``read`` is any callable returning up to n bytes (b"" at the end).  For each
    yielded entry of type "f", the caller may call ``payload()`` to receive its
    bytes; whatever it leaves unread is skipped (and counted as payload).
    """

    def __init__(self, stream: BinaryIO):
        self._read = stream.read
        self._buf = b""
        self._pos = 0
        self._framing: list[bytes] = []
        self._pending = 0  # payload bytes of the current entry not yet consumed
        self._pad = 0  # padding after the current payload
        self.trailer = b""
        self.entries = 0

    # Buffer -------------------------------------------------------------

    def _fill(self, n: int) -> bool:
        """Make at least n bytes available; False at end of stream."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            return True
        parts = [self._buf[self._pos :]]
        while avail < n:
            b = self._read(max(READ_SIZE, n - avail))
            if not b:
                self._buf, self._pos = b"".join(parts), 0
                return False
            parts.append(b)
            avail += len(b)
        self._buf, self._pos = b"".join(parts), 0
        return True

    def _take(self, n: int) -> bytes:
        if not self._fill(n):
            raise LayerFormatError("tar: unexpected end of data (truncated layer)")
        b = self._buf[self._pos : self._pos + n]
        self._pos += n
        return b

    def _take_some(self, n: int) -> bytes:
        """Up to n bytes (at least 1) without copying more than needed."""
        if self._pos >= len(self._buf):
            b = self._read(READ_SIZE)
            if not b:
                raise LayerFormatError("tar: unexpected end of data (truncated layer)")
            if len(b) > n:
                self._buf, self._pos = b, n
                return b[:n]
            return b
        b = self._buf[self._pos : self._pos + n]
        self._pos += len(b)
        return b

    # Payload --------------------------------------------------------------

    def payload(self, piece: int = READ_SIZE) -> Iterator[bytes]:
        while self._pending:
            b = self._take_some(min(piece, self._pending))
            self._pending -= len(b)
            yield b

    def _finish_entry(self) -> None:
        if self._pending:
            for _ in self.payload():
                pass
        if self._pad:
            self._framing.append(self._take(self._pad))
            self._pad = 0

    # Headers --------------------------------------------------------------

    def __iter__(self) -> Iterator[TarEntry]:
        pax_global: dict[str, bytes] = {}
        while True:
            self._finish_entry()
            pax: dict[str, bytes] = dict(pax_global)
            longname = longlink = None
            while True:
                pos = self._pos
                if len(self._buf) - pos >= BLOCK:  # the usual case, without _fill and _take
                    hdr = self._buf[pos : pos + BLOCK]
                    self._pos = pos + BLOCK
                elif not self._fill(BLOCK):
                    rest = self._buf[self._pos :]
                    if rest:
                        raise LayerFormatError("tar: unexpected end of data inside a header")
                    # A tar without end-of-archive blocks: accepted, like GNU tar does.
                    if pax or longname is not None or longlink is not None:
                        raise LayerFormatError("tar: unexpected end of data after an extension header")
                    if not self.entries and not self._framing:
                        # Even an empty tar has its end-of-archive blocks.
                        raise LayerFormatError("tar: no data at all (truncated layer)")
                    self.trailer = b"".join(self._framing)
                    return
                else:
                    hdr = self._take(BLOCK)
                if hdr == ZERO_BLOCK:
                    self._framing.append(hdr)
                    self._read_trailer()
                    return
                self._check_sum(hdr)
                typeflag = hdr[156:157]
                size = _number(hdr[124:136], "size")
                if size < 0:
                    raise LayerFormatError("tar header: negative size")
                if typeflag in (b"x", b"g", b"L", b"K"):
                    if size > MAX_EXTENSION:
                        raise LayerFormatError(f"tar: extension header of {size} bytes is too large")
                    padded = -size % BLOCK
                    data = self._take(size)
                    self._framing.append(hdr)
                    self._framing.append(data)
                    if padded:
                        self._framing.append(self._take(padded))
                    if typeflag == b"x":
                        pax.update(_parse_pax(data))
                    elif typeflag == b"g":
                        pax_global.update(_parse_pax(data))
                        pax.update(pax_global)
                    elif typeflag == b"L":
                        longname = _nul_terminated(data)
                    else:
                        longlink = _nul_terminated(data)
                    continue
                break
            self._framing.append(hdr)
            entry, size = self._entry(hdr, typeflag, size, pax, longname, longlink)
            self.entries += 1
            padded = -size % BLOCK
            if entry.type == "f":
                self._pending, self._pad = size, padded
            elif size:
                # Data behind a non-file header (allowed by the format, meaningless
                # to a filesystem): keep it as framing so the rebuild is exact.
                # Framing sits in memory, so bound it as extension headers are.
                if size > MAX_EXTENSION:
                    raise LayerFormatError(f"tar: {size} bytes of data behind the non-file entry {entry.name!r}")
                self._framing.append(self._take(size + padded))
            entry.framing = b"".join(self._framing)
            self._framing = []
            yield entry

    def _check_sum(self, hdr: bytes) -> None:
        want = _number(hdr[148:156], "checksum")
        # sum() over 512 bytes is a loop in Python's VM (2.3 us a header);
        # adler32's low half is 1 + the byte sum, exact when the sum is small.
        if hdr.count(0) >= _ADLER_EXACT_NULS:
            a = zlib.adler32(hdr[156:], zlib.adler32(_CHKSUM_SPACES, zlib.adler32(hdr[:148])))
            if (a & 0xFFFF) - 1 == want:
                return
        unsigned = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
        if want != unsigned:
            signed = unsigned - sum(b for b in hdr[:148] + hdr[156:] if b > 127) * 2
            if want != signed:
                raise LayerFormatError("tar: header checksum mismatch (corrupt or not a tar)")

    def _read_trailer(self) -> None:
        parts = [b"".join(self._framing)]
        self._framing = []
        total = 0
        rest = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        while rest:
            total += len(rest)
            if total > MAX_TRAILER:
                raise LayerFormatError("tar: too much data after the end-of-archive marker")
            parts.append(rest)
            rest = self._read(READ_SIZE)
        self.trailer = b"".join(parts)

    def _entry(self, hdr, typeflag, size, pax, longname, longlink) -> tuple[TarEntry, int]:
        if typeflag == b"S" or any(k.startswith("GNU.sparse.") for k in pax):
            raise LayerFormatError("tar: sparse files are not supported")
        name = longname if longname is not None else _nul_terminated(hdr[0:100])
        magic = hdr[257:263]
        if longname is None and magic == b"ustar\0":  # POSIX: prefix + '/' + name
            prefix = _nul_terminated(hdr[345:500])
            if prefix:
                name = prefix + b"/" + name
        if "path" in pax:
            name = pax["path"]
        linkname = longlink if longlink is not None else _nul_terminated(hdr[157:257])
        if "linkpath" in pax:
            linkname = pax["linkpath"]
        if typeflag == b"\0" and name.endswith(b"/"):
            type_ = "d"  # pre-POSIX directories
        elif typeflag in TYPES:
            type_ = TYPES[typeflag]
        else:
            raise LayerFormatError(f"tar: unsupported entry type {typeflag!r} for {name!r}")
        if "size" in pax:
            size = _int_pax(pax["size"], "size")
            if size < 0:  # the payload loop would never end
                raise LayerFormatError(f"tar: negative PAX size for {name!r}")
        try:  # the common case in one go; anything else takes the field-by-field path below
            mode = int(hdr[100:108].partition(b"\0")[0], 8)
            uid = int(hdr[108:116].partition(b"\0")[0], 8)
            gid = int(hdr[116:124].partition(b"\0")[0], 8)
            mtime = int(hdr[136:148].partition(b"\0")[0], 8)
        except ValueError:
            mtime = _number(hdr[136:148], "mtime")
            uid = None if "uid" in pax else _number(hdr[108:116], "uid")
            gid = None if "gid" in pax else _number(hdr[116:124], "gid")
            mode = _number(hdr[100:108], "mode")
        xattrs: dict[str, bytes] = {}
        if pax:
            if "mtime" in pax:
                mtime = _int_pax(pax["mtime"], "mtime")
            if "uid" in pax:
                uid = _int_pax(pax["uid"], "uid")
            if "gid" in pax:
                gid = _int_pax(pax["gid"], "gid")
        for k, v in pax.items():
            if k.startswith("SCHILY.xattr."):
                xattrs[k[13:]] = v
            elif k.startswith("LIBARCHIVE.xattr."):
                try:
                    xattrs[k[17:]] = base64.b64decode(v + b"=" * (-len(v) % 4))
                except ValueError:
                    raise LayerFormatError("tar: bad LIBARCHIVE.xattr value") from None
        dev = type_ in ("c", "b")
        entry = TarEntry(
            name=name,
            type=type_,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            size=size if type_ == "f" else 0,
            mtime=mtime,
            linkname=linkname,
            devmajor=_number(hdr[329:337], "devmajor") if dev else 0,
            devminor=_number(hdr[337:345], "devminor") if dev else 0,
            xattrs=xattrs,
        )
        return entry, size


def _int_pax(v: bytes, what: str) -> int:
    try:
        n = math.floor(float(v)) if b"." in v else int(v)
    except (ValueError, OverflowError):
        raise LayerFormatError(f"tar: bad PAX {what} {v!r}") from None
    return _fits(n, f"PAX {what}")
