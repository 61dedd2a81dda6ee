"""Writing tar headers directly: ustar, with a PAX record only where ustar falls short.

tarfile builds each header through several layers of Python (TarInfo copies,
per-field encoders, a PAX pass), about 60 us an entry; a view of 20k small
files spent most of its export there.  This writes the same format in a few
microseconds: POSIX ustar headers, plus a PAX extended header for what they
cannot hold (names over 100 bytes, numbers too large for their octal field,
negative times, xattrs).  Names are bytes and go out unchanged; a PAX path
that is not UTF-8 is marked hdrcharset=BINARY, as POSIX asks.
"""

from __future__ import annotations

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

REGTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
PAXTYPE = b"x"


# The largest value each octal field holds (width - 1 digits).
MAX7, MAX11 = 0o7777777, 0o77777777777
_UNAMES = bytes(64)  # uname and gname: empty
_TAIL = bytes(167)  # prefix and padding, after the device numbers


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# The checksum counts the chksum field as eight spaces; the zero bytes add
# nothing, so summing the fields that hold text is enough (a quarter of the
# block: this runs once per entry).
_FIXED_SUM = sum(b"        ") + sum(b"ustar\x0000")


def _ustar(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typeflag: bytes, linkname: bytes,
           devmajor: int, devminor: int) -> bytes:
    ids = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime)
    devs = b"%07o\0%07o\0" % (devmajor, devminor)
    chk = _FIXED_SUM + sum(name) + sum(ids) + typeflag[0] + sum(linkname) + sum(devs)
    return b"".join((
        name.ljust(100, b"\0"), ids, b"%06o\0 " % chk, typeflag, linkname.ljust(100, b"\0"), b"ustar\x0000",
        _UNAMES, devs, _TAIL,
    ))


def header(name: bytes, typeflag: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0, size: int = 0,
           mtime: int = 0, linkname: bytes = b"", devmajor: int = 0, devminor: int = 0,
           xattrs: dict[str, bytes] | None = None) -> bytes:
    """The header block(s) of one entry: a PAX header first when needed."""
    pax: list[bytes] = []
    binary = False
    if len(name) > 100:
        pax.append(_pax_record(b"path", name))
        binary = binary or not _is_utf8(name)
        name = name[:100]
    if len(linkname) > 100:
        pax.append(_pax_record(b"linkpath", linkname))
        binary = binary or not _is_utf8(linkname)
        linkname = linkname[:100]
    if not 0 <= uid <= MAX7:
        pax.append(_pax_record(b"uid", b"%d" % uid))
        uid = 0
    if not 0 <= gid <= MAX7:
        pax.append(_pax_record(b"gid", b"%d" % gid))
        gid = 0
    if size > MAX11:
        pax.append(_pax_record(b"size", b"%d" % size))
        size = 0
    if not 0 <= mtime <= MAX11:
        pax.append(_pax_record(b"mtime", b"%d" % mtime))
        mtime = 0
    for k, v in sorted((xattrs or {}).items()):
        pax.append(_pax_record(b"SCHILY.xattr." + k.encode("utf-8", "surrogateescape"), v))
    out = b""
    if pax:
        if binary:
            pax.insert(0, _pax_record(b"hdrcharset", b"BINARY"))
        data = b"".join(pax)
        out = _ustar(b"PaxHeader/" + name[:89], 0o644, 0, 0, len(data), 0, PAXTYPE, b"", 0, 0)
        out += data + bytes(-len(data) % BLOCK)
    return out + _ustar(name, mode & 0o7777, uid, gid, size, mtime, typeflag, linkname, devmajor & MAX7,
                        devminor & MAX7)


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


END = ZERO_BLOCK * 2
