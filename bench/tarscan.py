#!/usr/bin/env python3
"""What a user does today to find a file by content: hash every file in every layer tar.

    python3 bench/tarscan.py SHA256HEX LAYER.tar...

Streams each tar (tarfile, 1 MiB reads, hashlib), prints `tar path` for every
regular file whose sha256 matches.  The fastest honest way without an index.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile


def scan(want: str, tars: list[str]) -> list[tuple[str, str]]:
    hits = []
    for t in tars:
        with tarfile.open(t, "r|*") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                h = hashlib.sha256()
                f = tar.extractfile(m)
                while True:
                    b = f.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
                if h.hexdigest() == want:
                    hits.append((t, m.name))
    return hits


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    for t, name in scan(sys.argv[1].lower(), sys.argv[2:]):
        print(f"{t}\t{name}")


if __name__ == "__main__":
    main()
