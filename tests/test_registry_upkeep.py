"""rm, gc, fsck and stats on what pulls keep: manifests, indexes, layer descriptors, `seen`.

The expected rows come from the registry itself (`skopeo inspect --raw` of the
index and of each of its manifests), not from what layerdb stored.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import apsw
import pytest

from conftest import load_json_lines, run_cli

import registry_env as R
from registry_env import INSECURE, MULTI, SAMPLE, SAMPLE2

pytestmark = R.NEEDS
regs = R.regs  # the shared registries, a session fixture


def _raw(ref: str) -> bytes:
    return subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                          capture_output=True, check=True).stdout


def _digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _ok(db, *args):
    r = run_cli(*args, db_path=db)
    assert r.exit_code == 0, f"{args}: {r.output}"
    return r


def _rows(db, sql, args=()):
    conn = apsw.Connection(str(db))
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _seen(db) -> set[str]:
    return {d for (d,) in _rows(db, "SELECT digest FROM seen")}


def _digests_of(ref_name: str, manifest: bytes) -> set[str]:
    """The manifest's own digest, its config's and its layers', as the registry serves them."""
    doc = json.loads(manifest)
    return {_digest(manifest), doc["config"]["digest"], *(x["digest"] for x in doc["layers"])}


@pytest.fixture
def multi(regs, tmp_path):
    """A store holding both images of a two-platform index, and the registry's bytes of all three."""
    ref = R.seed(regs["plain"], f"oci-archive:{MULTI}:multi:1.0", "fx/multi:1.0", "--all")
    name = ref.rsplit(":", 1)[0]
    index = _raw(ref)
    children = {d["digest"]: _raw(f"{name}@{d['digest']}") for d in json.loads(index)["manifests"]}
    db = tmp_path / "s.sqlite"
    _ok(db, "pull", "-q", *INSECURE, "--all-platforms", ref)
    return db, index, children, name


def test_stats_and_fsck_count_the_registry_tables(multi):
    db, index, children, name = multi
    want_seen = {_digest(index)}.union(*(_digests_of(name, m) for m in children.values()))
    assert _seen(db) == want_seen
    (s,) = load_json_lines(_ok(db, "stats", "--json").stdout)
    layers = sum(len(json.loads(m)["layers"]) for m in children.values())
    assert (s["manifests"], s["indexes"], s["index_entries"], s["layer_descriptors"], s["seen"], s["registries"]) == (
        2, 1, 2, layers, len(want_seen), 1)
    assert s["manifest_bytes"] == len(index) + sum(len(m) for m in children.values())
    r = _ok(db, "fsck", "--json")
    assert r.stdout == ""
    from layerdb.engine.api import LayerDB

    with LayerDB(db) as ldb:
        check = ldb.fsck()
        assert list(check.findings()) == []
        assert check.counts["manifests"] == 3


def test_rm_drops_an_index_with_its_last_image_and_gc_drops_what_was_seen(multi):
    db, index, children, name = multi
    config = {d: json.loads(m)["config"]["digest"] for d, m in children.items()}
    ((tagged,),) = _rows(db, "SELECT i.digest FROM image i JOIN tag t ON t.image_id = i.id")
    (amd64,) = [d for d in children if config[d] == tagged]  # the one that got the name
    (arm64,) = [d for d in children if d != amd64]
    _ok(db, "rm", config[amd64])
    # The other platform's image keeps the index and its own entry.
    assert _rows(db, "SELECT digest, image_id IS NULL FROM manifest ORDER BY image_id IS NULL") == [
        (arm64, 0), (_digest(index), 1)]
    assert _rows(db, "SELECT p.digest, c.digest FROM manifest_child mc JOIN manifest p ON p.id = mc.index_id"
                     " JOIN manifest c ON c.id = mc.child_id") == [(_digest(index), arm64)]
    (g,) = load_json_lines(_ok(db, "gc", "--json").stdout)
    assert g["manifests"] == 0
    # What only the removed image named goes; what the other one names stays.
    assert _seen(db) == {_digest(index)} | _digests_of(name, children[arm64])
    assert g["seen"] == len({_digest(index)}.union(*(_digests_of(name, m) for m in children.values()))) - len(_seen(db))
    assert _ok(db, "fsck").exit_code == 0

    _ok(db, "rm", config[arm64])
    assert _rows(db, "SELECT count(*) FROM manifest") == [(0,)]  # the index went with its last image
    (g,) = load_json_lines(_ok(db, "gc", "--json").stdout)
    assert g["seen"] == 1 + len(_digests_of(name, children[arm64]))
    for t in ("manifest", "manifest_child", "manifest_layer", "seen"):
        assert _rows(db, f"SELECT count(*) FROM {t}") == [(0,)], t


def test_gc_keeps_what_a_shared_layer_still_names(regs, tmp_path):
    a = R.seed(regs["plain"], f"oci-archive:{SAMPLE}", "fx/sample:1.0")
    b = R.seed(regs["plain"], f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    db = tmp_path / "s.sqlite"
    _ok(db, "pull", "-q", *INSECURE, a)
    _ok(db, "pull", "-q", *INSECURE, b)
    ma, mb = _raw(a), _raw(b)
    shared = _digests_of("", ma) & _digests_of("", mb)
    assert shared, "premise: the two images share their bottom layer"
    _ok(db, "rm", a)
    _ok(db, "gc")
    assert _seen(db) == _digests_of("", mb)
    # The shared blob is still known in both repositories, so a push can mount it from either.
    host = a.split("/", 1)[0]
    assert sorted(_rows(db, "SELECT repository FROM seen WHERE digest = ? AND registry = ?",
                        (shared.pop(), host))) == [("fx/sample",), ("fx/sample2",)]


def test_an_old_store_with_an_orphaned_index_is_cleaned_by_gc(multi):
    """rm before this version left the index row behind: fsck accepts it, gc removes it."""
    db, index, children, name = multi
    conn = apsw.Connection(str(db))
    conn.execute("PRAGMA foreign_keys = ON")
    with conn:  # what an older rm did: the images and their manifests only
        conn.execute("DELETE FROM image")
    conn.close()
    assert _rows(db, "SELECT digest FROM manifest") == [(_digest(index),)]
    assert _ok(db, "fsck").exit_code == 0
    (g,) = load_json_lines(_ok(db, "gc", "--json").stdout)
    assert g["manifests"] == 1
    assert _rows(db, "SELECT count(*) FROM manifest") == [(0,)]


def _damage(db, sql, args=()):
    conn = apsw.Connection(str(db))
    with conn:
        conn.execute(sql, args)
    conn.close()


@pytest.mark.parametrize("what,sql,problem", [
    ("bytes", "UPDATE manifest SET data = CAST(replace(CAST(data AS TEXT), '\"size\"', '\"size\" ') AS BLOB)"
              " WHERE image_id = (SELECT image_id FROM tag)", "its stored bytes hash to sha256:"),
    ("descriptor", "UPDATE manifest_layer SET size = size + 1 WHERE idx = 2 AND manifest_id ="
                   " (SELECT id FROM manifest WHERE image_id = (SELECT image_id FROM tag))",
     "it names 6 layers, 6 descriptors are stored beside it (first difference at layer 3)"),
    ("lost descriptor", "DELETE FROM manifest_layer WHERE idx = 5 AND manifest_id ="
                        " (SELECT id FROM manifest WHERE image_id = (SELECT image_id FROM tag))",
     "it names 6 layers, 5 descriptors are stored beside it (first difference at layer 6)"),
    ("diff_id", "UPDATE manifest_layer SET diff_id = 'sha256:' || printf('%064d', 0) WHERE idx = 0 AND manifest_id ="
                " (SELECT id FROM manifest WHERE image_id = (SELECT image_id FROM tag))",
     "the diff_ids stored beside its layers are not its image's rootfs.diff_ids: position 1 is sha256:000"),
    ("media type", "UPDATE manifest SET media_type = 'application/x-nothing'"
                   " WHERE image_id = (SELECT image_id FROM tag)", "the store records application/x-nothing"),
])
def test_fsck_names_a_damaged_manifest_and_its_image(multi, what, sql, problem):
    db, index, children, name = multi
    tagged, digest = _rows(db, "SELECT t.name, i.digest FROM tag t JOIN image i ON i.id = t.image_id")[0]
    mdigest = _rows(db, "SELECT m.digest FROM manifest m JOIN tag t ON t.image_id = m.image_id")[0][0]
    _damage(db, sql)
    r = run_cli("fsck", "--json", db_path=db)
    assert r.exit_code != 0
    (f,) = load_json_lines(r.stdout)
    assert (f["check"], f["object"]) == ("manifest", mdigest)
    assert problem in f["problem"], f["problem"]
    assert f["images"] == [{"id": digest, "repo_tags": [tagged]}]


def test_fsck_names_an_index_entry_that_is_not_in_the_index(regs, multi):
    db, index, children, name = multi
    other = R.seed(regs["plain"], f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    _ok(db, "pull", "-q", *INSECURE, other)
    stray = _digest(_raw(other))
    _damage(db, "INSERT INTO manifest_child(index_id, child_id) SELECT i.id, m.id FROM manifest i, manifest m"
                " WHERE i.image_id IS NULL AND m.digest = ?", (stray,))
    r = run_cli("fsck", "--json", db_path=db)
    assert r.exit_code != 0
    (f,) = load_json_lines(r.stdout)
    assert (f["check"], f["object"]) == ("manifest", _digest(index))
    assert f["problem"] == f"its stored image manifest {stray} is not one of its entries"
