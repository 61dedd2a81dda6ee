#!/usr/bin/env python3
"""The import floor: the least work any importer must do on an OCI archive.

    python3 bench/floor.py ARCHIVE.oci.tar            # gunzip + sha256 of every layer
    python3 bench/floor.py --zstd ARCHIVE.oci.tar     # ... + zstd-3 of the tar stream

Single-threaded Python, streaming 1 MiB at a time, as a plain importer would
be.  zlib, hashlib and zstandard all release the GIL, so a pipelined importer
can beat this on two cores; that is the point of the 1.5x target.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import zlib

READ = 1 << 20


def floor(archive: str, zstd: bool) -> tuple[int, int]:
    """(layers, uncompressed bytes); raises if a diff_id does not match the config."""
    cctx = None
    if zstd:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=3)
    with tarfile.open(archive, "r:") as tar:
        members = {m.name: m for m in tar.getmembers()}

        def blob(digest: str):
            return tar.extractfile(members["blobs/sha256/" + digest.split(":", 1)[1]])

        index = json.load(tar.extractfile(members["index.json"]))
        n = total = 0
        done: set[str] = set()
        for desc in index["manifests"]:
            manifest = json.load(blob(desc["digest"]))
            config = json.load(blob(manifest["config"]["digest"]))
            for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
                if layer["digest"] in done:
                    continue
                done.add(layer["digest"])
                f = blob(layer["digest"])
                z = zlib.decompressobj(wbits=47)  # gzip or zlib header
                h = hashlib.sha256()
                comp = cctx.compressobj() if cctx else None
                while True:
                    b = f.read(READ)
                    if not b:
                        break
                    raw = z.decompress(b)
                    h.update(raw)
                    total += len(raw)
                    if comp:
                        comp.compress(raw)
                raw = z.flush()
                h.update(raw)
                total += len(raw)
                if comp:
                    comp.compress(raw)
                    comp.flush()
                if "sha256:" + h.hexdigest() != diff_id:
                    raise SystemExit(f"floor: diff_id mismatch in {layer['digest']}")
                n += 1
    return n, total


def main() -> None:
    args = sys.argv[1:]
    zstd = "--zstd" in args
    paths = [a for a in args if a != "--zstd"]
    if len(paths) != 1:
        raise SystemExit(__doc__)
    n, total = floor(paths[0], zstd)
    print(f"{n} layers, {total} bytes")


if __name__ == "__main__":
    main()
