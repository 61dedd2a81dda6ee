#!/usr/bin/env python3
"""What each store-size candidate buys (issue 16, target 2), measured on a real store.

    python bench/codec_study.py STORE.sqlite [--quick]

Reads every content of a store filled by `layerdb import` (the bench's family
archives), regroups and re-encodes it in memory under each candidate, and
prints the stored MiB and the encoder's CPU seconds for each: zstd level per
kind of content, long-distance matching, pack size, grouping small files by
file type, a dictionary trained per store for small files, and the FastCDC
chunk size for large files.  Nothing is written to the store.  The encoder's
CPU seconds are what the choice adds to an import on one core; the import's
wall time for the chosen settings is measured by bench_import.py.
"""

from __future__ import annotations

import collections
import os
import sys
import time

import apsw
import zstandard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from layerdb.engine.content import SMALL, sniff  # noqa: E402
from layerdb.engine.chunks import verified  # noqa: E402

MiB = 1 << 20


def contents(db: str):
    """{diff: [(sha, kind, bytes) of its small contents in tar order]}, [large contents], framing."""
    c = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    chunk_cache: dict[bytes, bytes] = {}

    def chunk(sha: bytes) -> bytes:
        if sha not in chunk_cache:
            if len(chunk_cache) > 64:
                chunk_cache.clear()
            size, codec, data = c.execute("SELECT size, codec, data FROM chunk WHERE sha256 = ?", (sha,)).fetchone()
            chunk_cache[sha] = verified(sha, size, codec, data)
        return chunk_cache[sha]

    def blob(bid: int) -> bytes:
        size, ch, off = c.execute("SELECT size, chunk, offset FROM blob WHERE id = ?", (bid,)).fetchone()
        if ch is not None:
            return chunk(ch)[off : off + size]
        return b"".join(chunk(r[0]) for r in c.execute("SELECT chunk FROM blob_chunk WHERE blob_id = ? ORDER BY seq",
                                                        (bid,)))

    seen: set[int] = set()
    small: dict[int, list[bytes]] = collections.defaultdict(list)
    large: list[bytes] = []
    framing: list[bytes] = []
    for diff, bid in list(c.execute("SELECT diff_id, blob_id FROM event WHERE blob_id IS NOT NULL ORDER BY diff_id, seq")):
        if bid in seen:
            continue
        seen.add(bid)
        data = blob(bid)
        if not data:
            continue
        (small[diff] if len(data) <= SMALL else large).append(data)
    for (fid,) in c.execute("SELECT framing FROM diff WHERE framing IS NOT NULL ORDER BY id"):
        framing.append(blob(fid))
    return small, large, framing


def packs(files: list[bytes], target: int, group: bool) -> list[bytes]:
    """Packs as the importer cuts them: in tar order, or one run of packs per kind."""
    runs: dict[str, list[bytes]] = collections.defaultdict(list)
    for f in files:
        runs[sniff(f) if group else "data"].append(f)
    out = []
    for fs in runs.values():
        cur: list[bytes] = []
        n = 0
        for f in fs:
            cur.append(f)
            n += len(f)
            if n >= target or len(cur) >= 4096:
                out.append(b"".join(cur))
                cur, n = [], 0
        if cur:
            out.append(b"".join(cur))
    return out


def encode(pieces: list[bytes], level: int = 3, ldm: bool = False, dict_data=None) -> tuple[int, float]:
    """(stored bytes, CPU seconds): each piece one frame, raw when zstd does not shrink it."""
    if ldm:
        params = zstandard.ZstdCompressionParameters.from_level(level, enable_ldm=True, window_log=27)
        cctx = zstandard.ZstdCompressor(compression_params=params, dict_data=dict_data)
    else:
        cctx = zstandard.ZstdCompressor(level=level, dict_data=dict_data)
    t = time.process_time()
    n = 0
    for p in pieces:
        n += min(len(p), len(cctx.compress(p)))
    return n, time.process_time() - t


def cdc(files: list[bytes], avg: int) -> list[bytes]:
    from fastcdc import fastcdc

    seen: set[bytes] = set()
    out = []
    import hashlib

    for f in files:
        for ch in fastcdc(memoryview(f), avg // 4, avg, avg * 4):
            b = f[ch.offset : ch.offset + ch.length]
            h = hashlib.sha256(b).digest()
            if h not in seen:
                seen.add(h)
                out.append(b)
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quick = "--quick" in sys.argv
    if len(args) != 1:
        raise SystemExit(__doc__)
    small, large, framing = contents(args[0])
    all_small = [f for fs in small.values() for f in fs]
    print(f"{len(all_small)} small contents {sum(map(len, all_small)) / MiB:.1f} MiB, "
          f"{len(large)} large {sum(map(len, large)) / MiB:.1f} MiB, framing {sum(map(len, framing)) / MiB:.1f} MiB")
    kinds = collections.Counter()
    for f in all_small:
        kinds[sniff(f)] += len(f)
    print("small by kind:", {k: f"{v / MiB:.1f} MiB" for k, v in kinds.items()})
    lk = collections.Counter()
    for f in large:
        lk[sniff(f)] += len(f)
    print("large by kind:", {k: f"{v / MiB:.1f} MiB" for k, v in lk.items()})

    def row(what, n_t):
        n, t = n_t
        print(f"  {what:58} {n / MiB:8.2f} MiB  {t:6.2f} s CPU")
        return n

    print("small contents (packs per diff):")
    base_packs = [p for fs in small.values() for p in packs(fs, MiB, False)]
    for lvl in (1, 3, 6, 9) if quick else (1, 3, 5, 6, 9, 12):
        row(f"1 MiB packs, tar order, zstd-{lvl}", encode(base_packs, lvl))
    row("1 MiB packs, tar order, zstd-3 + LDM", encode(base_packs, 3, ldm=True))
    for size in (2 * MiB, 4 * MiB, 8 * MiB):
        ps = [p for fs in small.values() for p in packs(fs, size, False)]
        row(f"{size // MiB} MiB packs, tar order, zstd-3", encode(ps, 3))
        row(f"{size // MiB} MiB packs, tar order, zstd-3 + LDM", encode(ps, 3, ldm=True))
    grouped = [p for fs in small.values() for p in packs(fs, MiB, True)]
    row("1 MiB packs, grouped by kind, zstd-3", encode(grouped, 3))
    grouped4 = [p for fs in small.values() for p in packs(fs, 4 * MiB, True)]
    row("4 MiB packs, grouped by kind, zstd-3", encode(grouped4, 3))
    for size in (16 << 10, 64 << 10, 112 << 10):
        samples = [f for f in all_small if len(f) <= 16 << 10][:20000]
        t = time.process_time()
        d = zstandard.train_dictionary(size, samples, level=3)
        tt = time.process_time() - t
        n, te = encode(base_packs, 3, dict_data=d)
        print(f"  {'1 MiB packs, dictionary of %d KiB (train %.2f s)' % (size >> 10, tt):58} "
              f"{(n + len(d.as_bytes())) / MiB:8.2f} MiB  {te:6.2f} s CPU")
    print("large contents (FastCDC chunks, each once):")
    base_chunks = cdc(large, 256 << 10)
    for lvl in (1, 3, 6, 9) if quick else (1, 3, 5, 6, 9, 12):
        row(f"256 KiB average chunks, zstd-{lvl}", encode(base_chunks, lvl))
    for avg in (64 << 10, 1 << 20):
        row(f"{avg >> 10} KiB average chunks, zstd-3", encode(cdc(large, avg), 3))
    print("framing:")
    for lvl in (3, 9, 19):
        row(f"framing, zstd-{lvl}", encode(framing, lvl))


if __name__ == "__main__":
    main()
