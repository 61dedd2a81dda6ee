"""`log PATH`: timelines checked against consecutive oracle manifests.

The expected timeline of a path is derived from the oracle views at every
position (containers/storage or umoci), not from layerdb: a path that appears
is an add, one that disappears a delete, one whose manifest line changes a
modify.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO_FIXTURES, SHARED_FIXTURES, oracle_positions

needs_shared = pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="../shared/fixtures is absent (CI has it)")


def oracle_timeline(oracle_dir, path: str) -> list[tuple[int, str, dict | None]]:
    rel = path.lstrip("/")
    out = []
    prev = None
    for pos in oracle_positions(oracle_dir):
        cur = None
        for line in (oracle_dir / f"{pos}.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["path"] == rel:
                cur = e
                break
        if prev is None and cur is not None:
            out.append((pos, "add", cur))
        elif prev is not None and cur is None:
            out.append((pos, "delete", None))
        elif prev is not None and cur != prev:
            out.append((pos, "modify", cur))
        prev = cur
    return out


def check(db, root, archive, oracle, path, tag="t:1"):
    db.import_archive(str(root / "images" / archive), tag=tag)
    want = oracle_timeline(root / "oracle" / oracle, path)
    assert want, "the oracle shows no change: pick another path"
    got = db.log(path, image=tag)
    assert [(r["position"], r["op"]) for r in got] == [(p, op) for p, op, _ in want]
    for r, (_, _, e) in zip(got, want):
        if e is None:
            assert r["type"] is None and r["sha256"] is None
            continue
        assert r["type"] == e["type"]
        assert r["mode"] == e["mode"]
        assert (r["uid"], r["gid"]) == (e["uid"], e["gid"])
        if e["type"] == "f":
            assert (r["size"], r["sha256"]) == (e["size"], e["sha256"])
        if e["type"] == "l":
            assert r["link"] == e["link"]
    return got


@needs_shared
def test_file_modified_in_every_layer(db):
    got = check(db, SHARED_FIXTURES, "fx-history.oci-zstd.tar", "fx-history", "/var/log/fx/journal")
    assert len(got) == 12
    assert got[0]["created_by"].endswith('echo "step 1" >> /var/log/fx/journal && echo 1 > /var/fx/current && echo "item 1" > /var/fx/item-01')


@needs_shared
def test_file_rewritten_and_chmodded(db):
    check(db, SHARED_FIXTURES, "fx-history.oci-zstd.tar", "fx-history", "/var/fx/current")


@needs_shared
def test_symlink_retargeted(db):
    check(db, SHARED_FIXTURES, "fx-history.oci-zstd.tar", "fx-history", "/var/fx/newest")


@needs_shared
def test_file_deleted_by_whiteout(db):
    got = check(db, SHARED_FIXTURES, "fx-ops.oci.tar", "fx-ops", "/srv/cfg/b.conf")
    assert got[-1]["via"] == "whiteout"


@needs_shared
def test_file_hidden_by_opaque_dir(db):
    got = check(db, SHARED_FIXTURES, "hc-opaque.oci.tar", "hc-opaque", "/cfg/nested/c.ini")
    assert got[-1]["via"] == "opaque"


@needs_shared
def test_hard_link_whose_target_changes(db):
    # h2 is appended to in layer 5; h1, the other name, changes with it.
    got = check(db, SHARED_FIXTURES, "fx-links.oci.tar", "fx-links", "/ln/h1")
    assert [r["position"] for r in got] == [3, 5]


@needs_shared
def test_symlink_replaced_by_file(db):
    got = check(db, SHARED_FIXTURES, "fx-links.oci.tar", "fx-links", "/ln/sym-abs")
    assert [r["type"] for r in got] == ["l", "f"]


def test_file_deleted_by_whiteout_of_its_parent(db):
    got = check(db, REPO_FIXTURES, "sample.oci.tar", "sample", "/app/docs/README.txt")
    assert got[-1]["op"] == "delete" and got[-1]["via"] == "parent-whiteout"
    assert got[-1]["created_by"] == "/bin/sh -c rm /app/old.log && rm -rf /app/docs"


def test_passwd_timeline_in_sample(db):
    got = check(db, REPO_FIXTURES, "sample.oci.tar", "sample", "/etc/passwd")
    assert [r["op"] for r in got] == ["add", "modify"]


@pytest.mark.parametrize("archive", ["opaque.oci.tar", "opaque.oci-zstd.tar", "opaque.docker.tar"])
def test_opaque_fixture_timelines(db, archive):
    oracle = REPO_FIXTURES / "oracle" / "opaque"
    paths = set()
    for pos in oracle_positions(oracle):
        for line in (oracle / f"{pos}.jsonl").read_text().splitlines():
            e = json.loads(line)
            if e["type"] != "d":  # directory mtimes are not in the oracle
                paths.add("/" + e["path"])
    db.import_archive(str(REPO_FIXTURES / "images" / archive), tag="o:1")
    for p in sorted(paths):
        want = oracle_timeline(oracle, p)
        got = db.log(p, image="o:1")
        assert [(r["position"], r["op"]) for r in got] == [(q, op) for q, op, _ in want], p


def test_log_of_unknown_path_is_an_error(db):
    from layerdb.engine.errors import NotFound

    db.import_archive(str(REPO_FIXTURES / "images" / "opaque.oci.tar"), tag="o:1")
    with pytest.raises(NotFound):
        db.log("/no/such/file", image="o:1")
