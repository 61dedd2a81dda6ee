"""Blob downloads: streamed, bounded by the declared size, verified, resumed with Range.

A download runs on a worker thread and writes into a Spool: an anonymous
temporary file (O_TMPFILE: it has no name, so a killed process leaves nothing
behind) that the importer reads while it fills.  The layer being imported thus
streams from the socket; the next ones, downloading in parallel, wait on disk
rather than in memory.  The reader sees the end of the blob only once its
size is checked.  A layer's digest is checked by its reader, the importer's
LayerStream, which hashes the blob anyway (Importer.ingest_tar's blob_digest,
also for a diff it has), before anything commits: hashing it here too cost a
second sha256 of every byte (fetch(verify=False)).  Spool.digest() hashes the
file again only when the import fails, to say whether the blob was bad.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from typing import Callable

from urllib3.exceptions import ProtocolError, SSLError, TimeoutError as _U3Timeout

from ..errors import DigestMismatch, LayerdbError, RegistryError, RegistryProtocolError, RegistryUnreachable
from ..log import get_logger
from .client import Client

log = get_logger("layerdb.registry")

READ = 1 << 20
RESUMES = 5  # resumes in a row that bring no new byte, before giving up


class Cancelled(Exception):
    """The pull stopped; a download thread ends quietly."""


class Spool:
    """One blob on its way: a writer thread appends, one reader follows behind."""

    def __init__(self, size: int):
        self.size = size
        self._fd = _anonymous_file()
        self._cond = threading.Condition()
        self._written = 0
        self._pos = 0
        self._done = False
        self._error: BaseException | None = None
        self.cancelled = threading.Event()

    # writer side
    def write(self, b: bytes) -> None:
        if self.cancelled.is_set():
            raise Cancelled()
        os.pwrite(self._fd, b, self._written)
        with self._cond:
            self._written += len(b)
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()

    # reader side
    def read(self, n: int = READ) -> bytes:
        with self._cond:
            while self._pos >= self._written and not self._done:
                self._cond.wait()
            if self._pos >= self._written:
                if self._error is not None:
                    raise self._error
                return b""
            k = min(n, self._written - self._pos)
        b = os.pread(self._fd, k, self._pos)
        self._pos += len(b)
        return b

    def error(self) -> BaseException | None:
        """How the download ended, once it has: None when the blob was whole (and,
        with fetch's verify, had its digest)."""
        with self._cond:
            return self._error

    def digest(self) -> str:
        """The sha256 of the bytes written so far, read back from the file."""
        h = hashlib.sha256()
        pos = 0
        while pos < self._written:
            b = os.pread(self._fd, min(READ, self._written - pos), pos)
            if not b:
                break
            h.update(b)
            pos += len(b)
        return "sha256:" + h.hexdigest()

    def close(self) -> None:
        self.cancelled.set()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _anonymous_file() -> int:
    d = tempfile.gettempdir()
    try:
        return os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        fd, name = tempfile.mkstemp(prefix="layerdb-pull-", dir=d)
        os.unlink(name)
        return fd


def fetch(client: Client, repo: str, digest: str, size: int, out: Callable[[bytes], None],
          progress: Callable[[int], None] | None = None, cancelled: threading.Event | None = None,
          verify: bool = True) -> None:
    """GET a blob into out(), resuming after a dropped connection.

    Bytes past the declared size are refused (a wrong or endless body), and with
    verify the sha256 must be the digest (without it, out()'s reader checks it).
    A resume sends Range; a 206 must start where we stopped, and a 200 (Range
    ignored) restarts the body from byte 0, whose first bytes are skipped as
    already had.
    """
    h = hashlib.sha256() if verify else None
    got = 0
    stalls = 0
    path = f"/v2/{repo}/blobs/{digest}"
    what = f"blob {digest}"
    while True:
        if cancelled is not None and cancelled.is_set():
            raise Cancelled()
        headers = {"Range": f"bytes={got}-"} if got else {}
        r = client.request("GET", path, scopes=[f"repository:{repo}:pull"], headers=headers, stream=True,
                           ok=(200, 206), what=what)
        skip = 0
        if got and r.status == 206:
            start = _range_start(r.headers.get("Content-Range"))
            if start != got:
                r.close()
                raise RegistryProtocolError(f"{what}: asked for bytes from {got}, got a range from {start}")
        elif got:
            skip = got  # 200: the whole blob again
            log.info("range ignored", blob=digest, restart_at=0)
        before = got
        try:
            while True:
                if cancelled is not None and cancelled.is_set():
                    r.close()
                    raise Cancelled()
                want = READ if skip else min(READ, size - got + 1)
                b = r.raw.read(want)
                if not b:
                    break
                if skip:
                    take = min(skip, len(b))
                    skip -= take
                    b = b[take:]
                    if not b:
                        continue
                if got + len(b) > size:
                    r.close()
                    raise RegistryProtocolError(f"{what}: the registry sent more than its declared {size} bytes")
                if h is not None:
                    h.update(b)
                got += len(b)
                out(b)
                if progress:
                    progress(got)
                if got == size:
                    # One more read: the body must end here (an endless one is cut off).
                    if r.raw.read(1):
                        r.close()
                        raise RegistryProtocolError(f"{what}: the registry sent more than its declared {size} bytes")
                    break
        except (ProtocolError, _U3Timeout, SSLError, OSError) as e:
            r.close()
            stalls = 0 if got > before else stalls + 1
            if stalls > RESUMES:
                raise RegistryUnreachable(f"{client.host}: {what}: the connection keeps failing ({e.__class__.__name__})") from None
            log.info("resume", blob=digest, at=got, reason=e.__class__.__name__)
            continue
        r.release()
        if got < size:
            stalls = 0 if got > before else stalls + 1
            if stalls > RESUMES:
                raise RegistryError(f"{client.host}: {what}: the body ends at {got} of {size} bytes")
            log.info("resume", blob=digest, at=got, reason="short body")
            continue
        break
    if h is not None:
        d = "sha256:" + h.hexdigest()
        if d != digest:
            raise DigestMismatch(what, digest, d)


def _range_start(value: str | None) -> int | None:
    # 'bytes 100-999/1000'
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def download_into(spool: Spool, client: Client, repo: str, digest: str, size: int,
                  progress: Callable[[int], None] | None = None, verify: bool = True) -> None:
    """Thread body: fetch into the spool and hand the outcome to its reader
    (verify=False: the reader checks the digest, see the module's docstring)."""
    try:
        fetch(client, repo, digest, size, spool.write, progress, spool.cancelled, verify)
    except Cancelled:
        spool.finish(RegistryError("pull cancelled"))
    except LayerdbError as e:
        spool.finish(e)
    except BaseException as e:  # a bug: keep its traceback for the reader
        spool.finish(e)
    else:
        spool.finish()
