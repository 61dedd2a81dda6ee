#!/usr/bin/env python3
"""Derive the hostile image archives in this directory from the repo's fixture images.

    python3 tests/hostile/make_hostile.py [OUTDIR]      # default: tests/hostile

Each archive starts as a copy of a real fixture (tests/fixtures/images, built
with buildah/skopeo) and gets one planted fault.  Most get one more layer on top
whose tar carries the hostile entries; every digest that names the new layer
(its blob digest, its diff_id in the config, the config's and the manifest's
digests) is recomputed, so only the check under test can catch the fault.
Members the edit does not touch are copied byte for byte (tests/archive_tools.py).

Only Python's tarfile, gzip, hashlib and zstandard are used; headers tarfile
cannot write (sparse maps, NUL bytes in names) are spelled out here.  Output is
deterministic for a given zlib/zstd version.  CASES lists every archive with
what it plants; tests/test_hostile.py says what layerdb must do with each.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zstandard

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
IMAGES = TESTS / "fixtures" / "images"
sys.path.insert(0, str(TESTS))
from archive_tools import ArchiveEditor, sha256_digest  # noqa: E402

MTIME = 1600000000
CREATED = "2020-09-13T12:26:40Z"
MEDIA = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
BASE = "opaque.oci.tar"  # 3 small gzip layers: every derived archive stays ~20 KB
BOMB_BYTES = 1 << 30  # what the zstd bombs expand to
GZIP_BOMB_BYTES = 32 << 20  # twice the 16 MiB engine/tarstream.py allows after the end of a tar


# Layer tars -----------------------------------------------------------------------


def entry(name: str, data: bytes = b"", type: bytes = tarfile.REGTYPE, linkname: str = "", mode: int | None = None,
          pax: dict | None = None, size: int | None = None) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.linkname = linkname
    ti.mtime = MTIME
    ti.mode = mode if mode is not None else (0o755 if type == tarfile.DIRTYPE else 0o644)
    ti.size = len(data) if size is None else size
    if type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = (1, 3) if type == tarfile.CHRTYPE else (8, 0)
    if pax:
        ti.pax_headers = dict(pax)
    return ti, data


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes]], end: bool = True, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A layer tar; end=False stops after the last entry (no end-of-archive blocks)."""
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=fmt)
    for ti, data in entries:
        if ti.type in tarfile.REGULAR_TYPES and ti.size == len(data):
            tf.addfile(ti, io.BytesIO(data))
        else:  # a header whose size says something else than the data that follows
            buf.write(ti.tobuf(fmt, tarfile.ENCODING, "surrogateescape"))
            buf.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
            tf.offset = buf.tell()
    if not end:
        return buf.getvalue()[: tf.offset]
    tf.close()
    return buf.getvalue()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def zst(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_checksum=True).compress(data)


def zstd_zeros(n: int) -> bytes:
    """A zstd frame of n zero bytes made of RLE blocks: 4 bytes per 128 KiB, whatever n."""
    block = 128 << 10
    assert n % block == 0
    # Frame header: no content size, no checksum, a 128 KiB window (exponent 7).
    out = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")
    count = n // block
    for i in range(count):
        last = 1 if i == count - 1 else 0
        out += ((block << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\0"
    return bytes(out)


COMPRESS: dict[str, Callable[[bytes], bytes]] = {"gzip": gz, "zstd": zst, "none": bytes}


def sha_of_zeros(prefix: bytes, n: int) -> str:
    """The diff_id of prefix + n zero bytes, without holding them."""
    h = hashlib.sha256(prefix)
    mib = b"\0" * (1 << 20)
    for _ in range(n >> 20):
        h.update(mib)
    h.update(b"\0" * (n & ((1 << 20) - 1)))
    return "sha256:" + h.hexdigest()


@dataclass
class Layer:
    blob: bytes  # as stored in the archive
    diff_id: str
    media_type: str
    created_by: str


def layer(tar: bytes, created_by: str, compression: str = "gzip") -> Layer:
    blob = COMPRESS[compression](tar)
    return Layer(blob, sha256_digest(tar), MEDIA[compression], created_by)


# Archives -------------------------------------------------------------------------


def on_top(layers: list[Layer], src: str = BASE) -> ArchiveEditor:
    """The fixture with more layers on top; config, manifest and index renamed to match."""
    ed = ArchiveEditor(IMAGES / src)
    cfg_name, mani_name = ed.config_name(), ed.oci_manifest_name()
    cfg, mani = ed.read_json(cfg_name), ed.read_json(mani_name)
    for ly in layers:
        name = "blobs/sha256/" + sha256_digest(ly.blob)[7:]
        if not ed.has(name):
            ed.add(name, ly.blob, like=mani_name)
        mani["layers"].append({"digest": sha256_digest(ly.blob), "mediaType": ly.media_type, "size": len(ly.blob)})
        cfg["rootfs"]["diff_ids"].append(ly.diff_id)
        cfg["history"].append({"created": CREATED, "created_by": ly.created_by})
    set_config(ed, cfg, mani)
    return ed


def set_config(ed: ArchiveEditor, cfg: dict, mani: dict) -> None:
    old = ed.config_name()
    new = json.dumps(cfg, separators=(",", ":")).encode()
    ed.add("blobs/sha256/" + sha256_digest(new)[7:], new, like=old)
    ed.delete(old)
    mani["config"] = dict(mani["config"], digest=sha256_digest(new), size=len(new))
    ed.replace_oci_manifest(json.dumps(mani, separators=(",", ":")).encode())


def one_layer(*entries: tuple[tarfile.TarInfo, bytes], why: str, compression: str = "gzip") -> ArchiveEditor:
    return on_top([layer(tar_bytes(list(entries)), why, compression)])


def truncated(compression: str, where: str) -> ArchiveEditor:
    tar = tar_bytes([entry("trunc/", type=tarfile.DIRTYPE),
                     entry("trunc/data.bin", hashlib.sha256(b"layerdb").digest() * 512)])
    blob = COMPRESS[compression](tar)
    at = {"middle": len(blob) // 2, "last-bytes": len(blob) - 3, "header": 512 + 200}[where]
    ly = Layer(blob[:at], sha256_digest(tar), MEDIA[compression], f"hostile: {compression} layer cut at {where}")
    if compression == "none":
        ly.diff_id = sha256_digest(blob[:at])  # an uncompressed blob is its tar: both digests agree
    return on_top([ly])


def nul_in_name() -> ArchiveEditor:
    # tarfile stops a ustar name at NUL; a PAX path record carries it whole.
    return one_layer(entry("nul-placeholder", b"x", pax={"path": "evil\0name"}), why="hostile: NUL in a PAX path")


def sparse_gnu() -> ArchiveEditor:
    """An old GNU sparse entry (typeflag S), as `tar --sparse --format=gnu` writes."""
    ti, data = entry("sparse.bin", b"sparse data")
    ti.type = tarfile.GNUTYPE_SPARSE
    buf = bytearray(ti.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape"))
    # One map entry {offset 1 MiB - 11, numbytes 11} and the real size, then the checksum again.
    buf[386:398] = b"%011o\0" % ((1 << 20) - 11)
    buf[398:410] = b"%011o\0" % 11
    buf[483:495] = b"%011o\0" % (1 << 20)
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    tar = bytes(buf) + data + b"\0" * (-len(data) % 512) + b"\0" * 1024
    return on_top([layer(tar, "hostile: GNU sparse entry (typeflag S)")])


def sparse_pax() -> ArchiveEditor:
    """A PAX 1.0 sparse entry, as `tar --sparse --format=pax` writes: map in the data."""
    smap = b"1\n%d\n11\n" % ((1 << 20) - 11)
    data = smap + b"\0" * (-len(smap) % 512) + b"sparse data"
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse.bin",
           "GNU.sparse.realsize": str(1 << 20)}
    return one_layer(entry("GNUSparseFile.0/sparse.bin", data, pax=pax), why="hostile: PAX 1.0 sparse entry")


def bomb(compression: str, diff_id_of: str | None = None) -> ArchiveEditor:
    """A small valid tar followed by zeros: the zeros pass the end-of-archive marker."""
    tar = tar_bytes([entry("bomb/", type=tarfile.DIRTYPE), entry("bomb/readme", b"zeros follow\n")])
    if compression == "gzip":
        blob = gz(tar + b"\0" * GZIP_BOMB_BYTES)
        diff_id = sha_of_zeros(tar, GZIP_BOMB_BYTES)
    else:
        blob = zst(tar) + zstd_zeros(BOMB_BYTES)
        diff_id = sha_of_zeros(tar, BOMB_BYTES)
    if diff_id_of is not None:
        # Claim a diff the store already holds: the importer only verifies such a layer.
        other = ArchiveEditor(IMAGES / diff_id_of)
        diff_id = other.read_json(other.config_name())["rootfs"]["diff_ids"][0]
    return on_top([Layer(blob, diff_id, MEDIA[compression], f"hostile: {compression} bomb")])


def data_behind_symlink() -> ArchiveEditor:
    """A symlink header declaring 1 GiB of data (zeros, from a 32 KiB zstd frame)."""
    ti, _ = entry("bomb-link", type=tarfile.SYMTYPE, linkname="target")
    ti.size = BOMB_BYTES
    hdr = ti.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    ti.size = 0  # tobuf wrote the size field; tarfile would refuse to write data for a symlink
    blob = zst(hdr) + zstd_zeros(BOMB_BYTES) + zst(b"\0" * 1024)
    return on_top([Layer(blob, sha_of_zeros(hdr, BOMB_BYTES + 1024), MEDIA["zstd"], "hostile: data behind a symlink")])


def duplicate_blob(bad: str) -> ArchiveEditor:
    """The new layer's blob member twice, one copy tampered (same length)."""
    good = layer(tar_bytes([entry("dup/", type=tarfile.DIRTYPE), entry("dup/file", b"the good copy\n")]),
                 "hostile: duplicate blob member", "none")
    ed = on_top([good])
    name = "blobs/sha256/" + sha256_digest(good.blob)[7:]
    tampered = good.blob.replace(b"the good copy", b"the evil copy")
    i = next(k for k, e in enumerate(ed.entries) if e[0].name == name)
    info, data, raw = ed.entries[i]
    twin = [info, tampered, None]
    if bad == "last":
        ed.entries.insert(i + 1, twin)
    else:
        ed.entries.insert(i, twin)
    return ed


def oci_manifest(change: Callable[[dict], bytes]) -> ArchiveEditor:
    ed = ArchiveEditor(IMAGES / BASE)
    ed.replace_oci_manifest(change(ed.read_json(ed.oci_manifest_name())))
    return ed


def empty_image() -> ArchiveEditor:
    """A manifest naming no layers and a config with no diff_ids: `FROM scratch` + CMD."""
    ed = ArchiveEditor(IMAGES / BASE)
    cfg, mani = ed.read_json(ed.config_name()), ed.read_json(ed.oci_manifest_name())
    cfg["rootfs"]["diff_ids"] = []
    cfg["history"] = [{"created": CREATED, "created_by": "/bin/sh -c #(nop) CMD [\"/bin/sh\"]", "empty_layer": True}]
    for d in mani["layers"]:
        ed.delete("blobs/sha256/" + d["digest"][7:])
    mani["layers"] = []
    set_config(ed, cfg, mani)
    return ed


def docker_symlink_loop() -> ArchiveEditor:
    """docker save: the first layer's member is a symlink into a loop (legacy <id>/layer.tar links)."""
    ed = ArchiveEditor(IMAGES / "opaque.docker.tar")
    manifest = ed.read_json("manifest.json")
    manifest[0]["Layers"][0] = "loop-a/layer.tar"
    ed.set("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
    for name, target in (("loop-a/layer.tar", "../loop-b/layer.tar"), ("loop-b/layer.tar", "../loop-a/layer.tar")):
        ti, _ = entry(name, type=tarfile.SYMTYPE, linkname=target, mode=0o777)
        ed.entries.append([ti, None, None])
    return ed


def stacked(*layers: tuple[str, list[tuple[tarfile.TarInfo, bytes]]]) -> ArchiveEditor:
    return on_top([layer(tar_bytes(entries), why) for why, entries in layers])


D, L, H, S = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.REGTYPE
DEEP = "d/" * 4095  # with the file's own name, 4,096 components: tarevents.MAX_DEPTH

CASES: dict[str, tuple[str, Callable[[], ArchiveEditor]]] = {
    # Truncation with every digest recomputed for the cut blob: only the format check can tell.
    "truncated-tar-header": ("an uncompressed layer cut inside a header block", lambda: truncated("none", "header")),
    "truncated-gzip-middle": ("a gzip layer cut in the middle", lambda: truncated("gzip", "middle")),
    "truncated-gzip-trailer": ("a gzip layer missing the last bytes of its trailer", lambda: truncated("gzip", "last-bytes")),
    "truncated-zstd-middle": ("a zstd layer cut in the middle", lambda: truncated("zstd", "middle")),
    "truncated-zstd-checksum": ("a zstd layer missing the last bytes of its checksum", lambda: truncated("zstd", "last-bytes")),
    "tar-without-end-blocks": ("a layer tar that stops after its last entry, digests matching",
                               lambda: on_top([layer(tar_bytes([entry("noend/", type=D), entry("noend/f", b"ok\n")], end=False),
                                                     "hostile: no end-of-archive blocks", "none")])),
    "size-beyond-data": ("a header declaring 1 MiB followed by 100 bytes and the end of the layer",
                         lambda: on_top([layer(tar_bytes([entry("short.bin", b"x" * 100, size=1 << 20)], end=False),
                                               "hostile: size beyond data", "none")])),
    "pax-negative-size": ("a PAX size record of -5", lambda: one_layer(entry("neg", b"abc", pax={"size": "-5"}),
                                                                         why="hostile: negative PAX size")),
    "pax-huge-number": ("a PAX uid of 2**64, past SQLite's 64-bit integers",
                        lambda: one_layer(entry("huge", b"x", pax={"uid": str(1 << 64)}), why="hostile: 2**64 uid")),
    "uid-out-of-range": ("PAX uid 2**40 and gid -5: valid tar, no such ids on Linux",
                         lambda: one_layer(entry("ids/", type=D), entry("ids/f", b"ids\n", pax={"uid": str(1 << 40), "gid": "-5"}),
                                           why="hostile: ids out of range")),
    # Blobs and manifests.
    "duplicate-blob-bad-last": ("the layer blob twice; the later copy tampered", lambda: duplicate_blob("last")),
    "duplicate-blob-bad-first": ("the layer blob twice; the earlier copy tampered", lambda: duplicate_blob("first")),
    "manifest-not-json": ("the OCI manifest blob is not JSON (index names its digest)",
                          lambda: oci_manifest(lambda m: b"{\"schemaVersion\": 2, \"config\": ")),
    "manifest-without-layers": ("the OCI manifest has no layers list",
                                lambda: oci_manifest(lambda m: json.dumps({k: v for k, v in m.items() if k != "layers"}).encode())),
    "manifest-empty-layers": ("a manifest naming no layers, a config with no diff_ids", empty_image),
    "archive-symlink-loop": ("docker save whose layer member is a symlink loop", docker_symlink_loop),
    # Paths.
    "path-dotdot": ("an entry ../../escape.txt", lambda: one_layer(entry("../../escape.txt", b"out\n"), why="hostile: ..")),
    "path-dotdot-inner": ("an entry cfg/../../escape.txt",
                          lambda: one_layer(entry("cfg/../../escape.txt", b"out\n"), why="hostile: inner ..")),
    "path-absolute": ("absolute names /abs/file.txt, /abs/dir/, and a hard link /abs/link => /abs/file.txt",
                      lambda: one_layer(entry("/abs/dir/", type=D), entry("/abs/file.txt", b"absolute\n"),
                                        entry("/abs/link", type=H, linkname="/abs/file.txt"), why="hostile: absolute names")),
    "whiteout-bare": ("a whiteout with no name: cfg/.wh.", lambda: one_layer(entry("cfg/.wh."), why="hostile: bare .wh.")),
    "path-nul": ("a NUL byte inside a PAX path", nul_in_name),
    "path-10000-components": ("a file 10,000 components deep",
                              lambda: one_layer(entry("/".join(["d"] * 9999 + ["f"]), b"deep\n"), why="hostile: deep path")),
    "path-4096-components": ("a file and a symlink 4,096 components deep (as deep as import accepts), a hard link to "
                             "the file at the top; layer 5 changes the file and removes the symlink",
                             lambda: stacked(("hostile: deep tree", [entry(DEEP + "f", b"deep\n"),
                                                                     entry(DEEP + "l", type=L, linkname="f"),
                                                                     entry("deeplink", type=H, linkname=DEEP + "f")]),
                                             ("hostile: deep change", [entry(DEEP + "f", b"deeper\n"),
                                                                       entry(DEEP + ".wh.l")]))),
    # Sizes.
    "bomb-gzip": ("a gzip layer: a small tar, then 32 MiB of zeros past its end (32 KiB compressed)", lambda: bomb("gzip")),
    "bomb-zstd": ("a zstd layer: a small tar, then 1 GiB of zeros past its end (32 KiB compressed)", lambda: bomb("zstd")),
    "bomb-zstd-known-diff": ("the zstd bomb claiming the diff_id of sample2's bottom layer",
                             lambda: bomb("zstd", diff_id_of="sample2.oci.tar")),
    "data-behind-symlink": ("a symlink header declaring 1 GiB of data", data_behind_symlink),
    "sparse-gnu": ("an old GNU sparse entry (typeflag S)", sparse_gnu),
    "sparse-pax": ("a PAX 1.0 sparse entry (GNU.sparse.* records)", sparse_pax),
    # Links.
    "hardlink-missing": ("a hard link to a path no layer has",
                         lambda: one_layer(entry("links/orphan", type=H, linkname="no/such/file"),
                                           why="hostile: hard link to nothing")),
    "hardlink-dotdot": ("a hard link to ../../../etc/passwd",
                        lambda: one_layer(entry("links/passwd", type=H, linkname="../../../etc/passwd"),
                                          why="hostile: hard link outside")),
    "symlink-loop": ("symlinks loop/a -> b, loop/b -> a, loop/self -> self, loop/up -> ../loop/up",
                     lambda: one_layer(entry("loop/", type=D), entry("loop/a", type=L, linkname="b"),
                                       entry("loop/b", type=L, linkname="a"), entry("loop/self", type=L, linkname="self"),
                                       entry("loop/up", type=L, linkname="../loop/up"), why="hostile: symlink loops")),
    # Export --dir escapes: each is imported; the test exports it into a directory.
    "export-symlink-escape": ("layer 4: a -> /etc and b -> ../escaped; layer 5: a/passwd and b/canary",
                              lambda: stacked(("hostile: a -> /etc, b -> ../escaped",
                                               [entry("a", type=L, linkname="/etc"), entry("b", type=L, linkname="../escaped")]),
                                              ("hostile: write through them",
                                               [entry("a/passwd", b"root::0:0::/:/bin/sh\n"), entry("b/canary", b"escaped\n")]))),
    "export-hardlink-absolute": ("etc/passwd in the image, and a hard link h => /etc/passwd",
                                 lambda: one_layer(entry("etc/", type=D), entry("etc/passwd", b"image's own passwd\n"),
                                                   entry("h", type=H, linkname="/etc/passwd"), why="hostile: absolute hard link")),
    "export-devices": ("a character device, a block device and a fifo",
                       lambda: one_layer(entry("dev/", type=D), entry("dev/mem", type=tarfile.CHRTYPE),
                                         entry("dev/sda", type=tarfile.BLKTYPE), entry("dev/fifo", type=tarfile.FIFOTYPE),
                                         why="hostile: device files")),
}


def build(outdir: Path, names: list[str] | None = None) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names or list(CASES):
        _, make = CASES[name]
        out.append(make().write(outdir / f"{name}.tar"))
    return out


if __name__ == "__main__":
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for p in build(dest):
        print(f"{p.stat().st_size:>8} {p.name}")
