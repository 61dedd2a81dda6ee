"""FUSE mounts (engine/fusefs.py), served by a real `layerdb mount` process.

Read-only: every file's bytes and metadata, read through the mount by
tree_manifest.py, equal the fixture's oracle.  Read-write: real programs (sh,
cp, sed -i, rm -r, mv, ln, truncate, touch) run in the mounted container and
in a directory holding the image's export; the trees must agree through the
mount, in the container's export and in the committed image.

Skipped only when FUSE is unavailable (/dev/fuse, fusermount3, pyfuse3).
Every mount is unmounted in a finally block.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_FIXTURES, SHARED_FIXTURES, export_bytes, manifest_of_dir, manifest_of_tar_bytes, \
    oracle_lines, oracle_positions, run_cli


def _fuse_missing() -> str | None:
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError:
        return "pyfuse3/trio are not installed (pip install -e '.[fuse]')"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable here"
    if not shutil.which("fusermount3"):
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


pytestmark = pytest.mark.skipif(_fuse_missing() is not None, reason=_fuse_missing() or "")

SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
T = 1_700_086_400
MOUNT_WAIT = 60.0  # a deadline for the mount to appear, not a timing assertion


def _is_mounted(mnt: Path) -> bool:
    from layerdb.engine.containers.fusefs import is_mounted

    return is_mounted(str(mnt))


@contextlib.contextmanager
def mounted(db_path: Path, args: list[str], mnt: Path):
    """`layerdb mount ARGS MNT` in a background process; yields the process."""
    mnt.mkdir(exist_ok=True)
    log = open(mnt.parent / f"{mnt.name}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "layerdb.cli", "--db", str(db_path), "mount", *args, str(mnt)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + MOUNT_WAIT
        while not _is_mounted(mnt):
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"layerdb mount exited with {proc.returncode}: "
                            f"{(mnt.parent / f'{mnt.name}.log').read_text(errors='replace')}")
            if time.monotonic() > deadline:
                pytest.fail("layerdb mount did not mount in time")
            time.sleep(0.05)
        yield proc
    finally:
        if _is_mounted(mnt):
            if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _ro_cases():
    cases = [("sample", SAMPLE, REPO_FIXTURES / "oracle" / "sample")]
    for name in ("fx-links", "fx-ops"):
        if SHARED_FIXTURES.is_dir():
            cases.append((name, SHARED_FIXTURES / "images" / f"{name}.oci.tar", SHARED_FIXTURES / "oracle" / name))
    return cases


@pytest.mark.parametrize("name,archive,oracle", _ro_cases(), ids=[c[0] for c in _ro_cases()])
def test_read_only_mount_matches_oracle(tmp_path, name, archive, oracle):
    dbp = tmp_path / "s.sqlite"
    assert run_cli("import", str(archive), "--tag", f"{name}:t", db_path=dbp).exit_code == 0
    positions = oracle_positions(oracle)
    for pos in (positions[-1], positions[len(positions) // 2]):
        ref = f"{name}:t~{positions[-1] - pos}"
        mnt = tmp_path / f"mnt{pos}"
        with mounted(dbp, ["--at", ref], mnt):
            assert manifest_of_dir(mnt) == oracle_lines(oracle, pos)
            with pytest.raises(OSError) as e:
                (mnt / "new-file").write_bytes(b"x")
            assert e.value.errno == 30  # EROFS
            r = run_cli("umount", str(mnt))
            assert r.exit_code == 0, r.output
            assert not _is_mounted(mnt)


SCRIPT = r"""
set -e
echo hello > etc/motd
echo more >> app/VERSION
cp etc/passwd tmp/passwd.copy
sed -i s/nobody/somebody/ etc/passwd
rm -r app/cache
mkdir app/cache
echo fresh > app/cache/fresh.txt
chmod 700 app/run.sh
ln -s ../etc/motd app/motd-link
ln app/settings.ini app/settings.hard
mkdir -p srv/www/html
seq 1 20000 > srv/www/html/index.html
mv app/config.ini srv/www/config.ini
mv srv/www/html srv/www/public
rm etc/group
dd if=/dev/zero of=srv/big bs=65536 count=8 status=none
truncate -s 1000 srv/big
sh -c 'printf "%s\n" one two > tmp/two-lines'
"""
# Files whose mtime the script sets to "now": made equal in both trees afterwards.
TOUCHED = ["etc/motd", "app/VERSION", "tmp/passwd.copy", "etc/passwd", "app/cache/fresh.txt", "app/motd-link",
           "srv/www/public/index.html", "srv/big", "tmp/two-lines"]

EXPECTED_DIFF = [
    "C /app", "C /app/VERSION", "C /app/cache", "A /app/cache/fresh.txt", "D /app/cache/new", "D /app/config.ini",
    "A /app/motd-link", "C /app/run.sh", "A /app/settings.hard", "C /app/version.txt", "C /etc", "D /etc/group",
    "C /etc/motd", "C /etc/passwd", "A /srv", "A /srv/big", "A /srv/www", "A /srv/www/config.ini",
    "A /srv/www/public", "A /srv/www/public/index.html", "C /tmp", "A /tmp/passwd.copy", "A /tmp/two-lines",
]


def _store_with_container(tmp_path: Path, name: str) -> Path:
    dbp = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=dbp).exit_code == 0
    assert run_cli("container", "create", "sample:1.0", "--name", name, db_path=dbp).exit_code == 0
    return dbp


def _run_script(root: Path) -> None:
    subprocess.run(["sh", "-c", SCRIPT], cwd=root, check=True)
    subprocess.run(["touch", "-h", "-d", f"@{T}", *TOUCHED], cwd=root, check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="export --dir keeps owners only when run as root")
def test_read_write_mount_runs_programs_then_diff_and_commit(tmp_path):
    dbp = _store_with_container(tmp_path, "box")
    twin = tmp_path / "twin"
    assert run_cli("export", "--at", "sample:1.0", "--dir", str(twin), db_path=dbp).exit_code == 0
    _run_script(twin)
    want = manifest_of_dir(twin)

    mnt = tmp_path / "mnt"
    with mounted(dbp, ["box"], mnt) as proc:
        _run_script(mnt)
        assert manifest_of_dir(mnt) == want
        assert os.stat(mnt / "app/VERSION").st_ino == os.stat(mnt / "app/version.txt").st_ino
        assert os.stat(mnt / "app/settings.hard").st_nlink == 2
        assert (mnt / "srv/www/public/index.html").read_bytes() == (twin / "srv/www/public/index.html").read_bytes()
        assert run_cli("umount", str(mnt)).exit_code == 0
        assert proc.wait(timeout=30) == 0

    from layerdb.engine.api import LayerDB

    with LayerDB(dbp) as db:
        assert manifest_of_tar_bytes(export_bytes(db, "box"), tmp_path) == want
    r = run_cli("container", "diff", "box", db_path=dbp)
    assert r.output.splitlines() == EXPECTED_DIFF
    r = run_cli("commit", "box", "sample:fused", "-m", "programs", "--json", db_path=dbp)
    assert r.exit_code == 0, r.output
    with LayerDB(dbp) as db:
        assert manifest_of_tar_bytes(export_bytes(db, "sample:fused"), tmp_path) == want
        names = [n for n in _layer_names(db, "sample:fused")]
    assert {"app/cache/.wh..wh..opq", "app/.wh.config.ini", "etc/.wh.group"} <= set(names)
    assert names == sorted(names, key=lambda n: n.encode("utf-8", "surrogateescape"))


def _layer_names(db, ref: str) -> list[str]:
    import io
    import tarfile

    diff_id = db.history(ref)[0]["diff_id"]
    with tarfile.open(fileobj=io.BytesIO(b"".join(db.layer_tar(diff_id)))) as tar:
        return [m.name for m in tar]


def test_mount_crash_loses_no_closed_write(tmp_path):
    dbp = _store_with_container(tmp_path, "c")
    mnt = tmp_path / "mnt"
    with mounted(dbp, ["c"], mnt) as proc:
        subprocess.run(["sh", "-c", "echo durable > etc/kept && mkdir -p var/x && rm etc/group"], cwd=mnt,
                       check=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not _is_mounted(mnt)
    assert run_cli("cat", "--at", "c", "/etc/kept", db_path=dbp).stdout_bytes == b"durable\n"
    r = run_cli("container", "diff", "c", db_path=dbp)
    assert r.output.splitlines() == ["C /etc", "D /etc/group", "A /etc/kept", "A /var", "A /var/x"]


def test_sigint_unmounts_and_saves_open_files(tmp_path):
    dbp = _store_with_container(tmp_path, "c")
    mnt = tmp_path / "mnt"
    with mounted(dbp, ["c"], mnt) as proc:
        (mnt / "etc/closed").write_bytes(b"closed\n")
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0
        assert not _is_mounted(mnt)
    assert run_cli("cat", "--at", "c", "/etc/closed", db_path=dbp).stdout_bytes == b"closed\n"


def test_mount_errors_are_one_line(tmp_path):
    dbp = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=dbp).exit_code == 0
    (tmp_path / "mnt").mkdir()
    r = run_cli("mount", "sample:1.0", str(tmp_path / "mnt"), db_path=dbp)
    assert r.exit_code == 5 and "--at sample:1.0" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("umount", str(tmp_path / "mnt"), db_path=dbp)
    assert r.exit_code == 2 and "no layerdb mount" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tar"), reason="needs root and GNU tar")
def test_tar_extracts_into_the_mount_as_into_a_directory(tmp_path):
    """GNU tar -xp --xattrs of a tricky view (fifo, setuid, xattrs, hard links, long and
    non-UTF-8 names when ../shared is there) through the mount, against a host directory."""
    dbp = _store_with_container(tmp_path, "c")
    archive = SHARED_FIXTURES / "images" / "fx-links.oci.tar"
    src = "fx:1"
    if not archive.is_file():
        archive, src = SAMPLE, "sample:1.0"
    assert run_cli("import", str(archive), "--tag", src, db_path=dbp).exit_code == 0
    view = tmp_path / "view.tar"
    assert run_cli("export", "--at", src, "-o", str(view), db_path=dbp).exit_code == 0
    tar = ["tar", "--xattrs", "--xattrs-include=*", "-xpf", str(view), "-C"]
    host = tmp_path / "host"
    host.mkdir()
    subprocess.run(tar + [str(host)], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    with mounted(dbp, ["c"], mnt):
        (mnt / "x").mkdir()
        subprocess.run(tar + [str(mnt / "x")], check=True, capture_output=True)
        assert manifest_of_dir(mnt / "x") == manifest_of_dir(host)
    out = tmp_path / "out"
    assert run_cli("cp", "--allow-devices", "c:/x", str(out), db_path=dbp).exit_code == 0
    assert manifest_of_dir(out) == manifest_of_dir(host)
