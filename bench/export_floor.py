#!/usr/bin/env python3
"""The export floor: the least work an export from verified zstd chunks must do.

    python3 bench/export_floor.py --prepare TREE FRAMES   # untimed: TREE's tar as chunks on disk
    python3 bench/export_floor.py FRAMES | cat >/dev/null  # timed: the floor

--prepare writes `tar -cf - .` of TREE (the bench's unpacked image) as a file of
4 MiB pieces, each compressed with zstd level 3 and stored with the sha256 of
its bytes: layerdb's packs and chunks without the store around them.

The timed run reads the pieces in order from that file (in the page cache once
prepared), decodes each and checks its sha256 on two helper threads (zstandard
and hashlib release the GIL), up to 8 MiB ahead, and writes the bytes to stdout
in order, through a pipe widened to 1 MiB, as `layerdb export -o -` does.  It
resolves no view, builds no tar header (they are in the pieces already) and
reads no database: whatever an export of this design does beyond it is its own
overhead, and `tar -cf - . | cat`, which neither decodes nor verifies, can be
beaten only by doing less than this.
"""

from __future__ import annotations

import collections
import hashlib
import os
import stat
import struct
import subprocess
import sys
import threading

PIECE = 4 << 20
AHEAD = 8 << 20
HEAD = struct.Struct(">II32s")  # raw size, stored size, sha256


def prepare(tree: str, out: str) -> int:
    import zstandard

    cctx = zstandard.ZstdCompressor(level=3)
    tar = subprocess.Popen(["tar", "-cf", "-", "."], cwd=tree, stdout=subprocess.PIPE)
    n = 0
    with open(out, "wb") as f:
        while True:
            raw = tar.stdout.read(PIECE)
            if not raw:
                break
            z = cctx.compress(raw)
            f.write(HEAD.pack(len(raw), len(z), hashlib.sha256(raw).digest()))
            f.write(z)
            n += len(raw)
    if tar.wait() != 0:
        raise SystemExit(f"export_floor: tar of {tree} failed")
    return n


class _Piece:
    __slots__ = ("size", "sha", "data", "done", "result")

    def __init__(self, size: int, sha: bytes, data: bytes):
        self.size, self.sha, self.data = size, sha, data
        self.done = threading.Event()
        self.result = b""


def _decode(jobs) -> None:
    import zstandard

    d = zstandard.ZstdDecompressor()
    while (p := jobs.get()) is not None:
        raw = d.decompress(p.data, max_output_size=p.size)
        ok = len(raw) == p.size and hashlib.sha256(raw).digest() == p.sha
        p.result, p.data = (raw if ok else None), b""
        p.done.set()


def floor(frames: str) -> int:
    import queue

    out = sys.stdout.buffer
    try:
        fd = out.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    helpers = [threading.Thread(target=_decode, args=(jobs,), daemon=True) for _ in range(2)]
    for t in helpers:
        t.start()
    pending: collections.deque[_Piece] = collections.deque()
    ahead = total = 0
    with open(frames, "rb") as f:
        eof = False
        while True:
            while not eof and ahead < AHEAD:
                head = f.read(HEAD.size)
                if not head:
                    eof = True
                    break
                size, stored, sha = HEAD.unpack(head)
                p = _Piece(size, sha, f.read(stored))
                pending.append(p)
                ahead += size
                jobs.put(p)
            if not pending:
                break
            p = pending.popleft()
            ahead -= p.size
            p.done.wait()
            if p.result is None:
                raise SystemExit("export_floor: a piece does not verify")
            out.write(p.result)
            total += p.size
            p.result = b""
    out.flush()
    for _ in helpers:
        jobs.put(None)
    return total


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "--prepare":
        print(f"{prepare(args[1], args[2])} bytes")
    elif len(args) == 1:
        floor(args[0])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
