"""Audits: diff, history --changes, find, waste, log --all / -p / --at-version.

Expected results come from outside layerdb: the oracle manifests of every view
(containers/storage or umoci) and the layer tars of the archives themselves,
read here with tarfile, gzip and zstandard.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import gzip
import hashlib
import io
import json
import posixpath
import tarfile

import pytest

from conftest import (REPO_FIXTURES, SHARED_FIXTURES, load_json_lines, oracle_lines, oracle_positions, replaying,
                      run_cli)
from test_explore_efficiency import dive_score, images_of, trees_of
from test_log import oracle_timeline
from test_views import _cases

CASES = _cases(REPO_FIXTURES) + _cases(SHARED_FIXTURES)
SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
SAMPLE2 = REPO_FIXTURES / "images" / "sample2.oci.tar"
OPAQUE = REPO_FIXTURES / "images" / "opaque.oci.tar"
needs_shared = pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="../shared/fixtures is absent (CI has it)")


# Independent expectations ---------------------------------------------------------

def oracle_dir(archive, oracle):
    return archive.parent.parent / "oracle" / oracle


@functools.lru_cache(maxsize=None)  # read-only by the tests; the oracles never change
def oracle_view(odir, pos) -> dict[str, dict]:
    if pos == 0:
        return {}
    return {"/" + e["path"]: e for e in map(json.loads, oracle_lines(odir, pos))}


def oracle_diff(before: dict, after: dict) -> set[tuple]:
    out = set()
    for p in before.keys() | after.keys():
        a, b = before.get(p), after.get(p)
        if a == b:
            continue
        if a is None:
            out.add((p, "A", None))
        elif b is None:
            out.add((p, "D", None))
        elif a["type"] != b["type"]:
            out.add((p, "C", "type"))
        elif (a.get("sha256"), a.get("size")) != (b.get("sha256"), b.get("size")):
            out.add((p, "C", "content"))
        else:
            out.add((p, "C", "metadata"))
    return out


def got_diff(rows) -> set[tuple]:
    return {(r["path"], r["change"], r["what"]) for r in rows}


def _layer_bytes(outer: tarfile.TarFile, name: str) -> bytes:
    data = outer.extractfile(name).read()
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _norm(name: str) -> str:
    return "/" + "/".join(p for p in name.split("/") if p and p != ".")


@functools.lru_cache(maxsize=None)
def layer_members(archive, tag: str | None = None) -> list[list[dict]]:
    """Per position (index 0 = position 1): the layer tar's members, in tar order."""
    with tarfile.open(archive) as outer:
        names = outer.getnames()
        if "manifest.json" in names:
            manifests = json.load(outer.extractfile("manifest.json"))
            m = next((m for m in manifests if tag and tag in (m.get("RepoTags") or [])), manifests[0])
            layers = m["Layers"]
        else:
            index = json.load(outer.extractfile("index.json"))
            desc = index["manifests"][0]
            manifest = json.load(outer.extractfile("blobs/sha256/" + desc["digest"][7:]))
            while "manifests" in manifest:  # a nested index
                manifest = json.load(outer.extractfile("blobs/sha256/" + manifest["manifests"][0]["digest"][7:]))
            layers = ["blobs/sha256/" + d["digest"][7:] for d in manifest["layers"]]
        out = []
        for name in layers:
            members = []
            with tarfile.open(fileobj=io.BytesIO(_layer_bytes(outer, name)), encoding="utf-8",
                              errors="surrogateescape") as t:
                for m in t:
                    e = {"path": _norm(m.name), "name": posixpath.basename(_norm(m.name)), "size": m.size,
                         "mode": "%04o" % m.mode}
                    if m.isreg():
                        e["type"] = "f"
                        e["sha256"] = hashlib.sha256(t.extractfile(m).read()).hexdigest()
                    elif m.islnk():
                        e["type"], e["link"] = "h", _norm(m.linkname)
                    elif m.issym():
                        e["type"], e["link"] = "l", m.linkname
                    else:
                        e["type"] = {tarfile.DIRTYPE: "d", tarfile.FIFOTYPE: "p", tarfile.CHRTYPE: "c",
                                     tarfile.BLKTYPE: "b"}[m.type]
                    members.append(e)
            out.append(members)
        return out


def is_whiteout(e: dict) -> bool:
    return e["name"].startswith(".wh.")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One store per archive, shared by the read-only tests of this module (imports fsync)."""
    from layerdb.engine.api import LayerDB

    opened: dict = {}

    def get(archive, tag):
        key = (archive, tag)
        if key not in opened:
            opened[key] = LayerDB(tmp_path_factory.mktemp("audit") / "store.sqlite")
            opened[key].import_archive(str(archive), tag=tag)
        return opened[key]

    yield get
    for d in opened.values():
        d.close()


def members_of(archive, ref, tag):
    # A multi-image archive's images are told apart by their RepoTags (the ref).
    return layer_members(archive, tag or ref)


# diff and history --changes -----------------------------------------------------------

@pytest.mark.parametrize("archive,oracle,ref,tag", CASES)
def test_diff_of_every_pair_of_positions_matches_oracle(stores, archive, oracle, ref, tag):
    from layerdb.engine import audit

    db = stores(archive, tag)
    top = db.resolve(ref).position
    odir = oracle_dir(archive, oracle)
    views = {n: oracle_view(odir, n) for n in oracle_positions(odir)}
    assert max(views) == top
    for i in views:
        for j in views:
            want = oracle_diff(views[i], views[j])
            r1, r2 = f"{ref}~{top - i}", f"{ref}~{top - j}"
            assert got_diff(audit.diff(db, r1, r2)) == want, (i, j)
            assert got_diff(audit.diff(db, r1, r2, restrict=False)) == want, (i, j)


@pytest.mark.parametrize("archive,oracle,ref,tag", CASES)
def test_history_changes_match_consecutive_oracles(stores, archive, oracle, ref, tag):
    from layerdb.engine import audit

    db = stores(archive, tag)
    top = db.resolve(ref).position
    odir = oracle_dir(archive, oracle)
    rows = audit.changes(db, ref)
    assert [r["position"] for r in rows] == sorted((r["position"] for r in rows), reverse=True)
    chain = {li.position: li.chain_id for li in db.resolve(ref).layers}
    for n in range(1, top + 1):
        mine = [r for r in rows if r["position"] == n]
        assert got_diff(mine) == oracle_diff(oracle_view(odir, n - 1), oracle_view(odir, n)), n
        assert {r["layer_id"] for r in mine} <= {chain[n]}


def test_diff_of_unrelated_and_related_images(db):
    from layerdb.engine import audit

    for archive, tag in ((SAMPLE, "s:1"), (SAMPLE2, "s2:1"), (OPAQUE, "o:1")):
        db.import_archive(str(archive), tag=tag)
    tops = {t: oracle_view(REPO_FIXTURES / "oracle" / o, max(oracle_positions(REPO_FIXTURES / "oracle" / o)))
            for t, o in (("s:1", "sample"), ("s2:1", "sample2"), ("o:1", "opaque"))}
    for a in tops:
        for b in tops:
            want = oracle_diff(tops[a], tops[b])
            assert got_diff(audit.diff(db, a, b)) == want, (a, b)
            assert got_diff(audit.diff(db, a, b, restrict=False)) == want, (a, b)


def test_diff_cli_json_and_stat(tmp_path):
    store = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=store).exit_code == 0
    rows = load_json_lines(run_cli("diff", "sample:1.0~4", "sample:1.0~3", "--json", db_path=store).stdout)
    odir = REPO_FIXTURES / "oracle" / "sample"
    assert got_diff(rows) == oracle_diff(oracle_view(odir, 2), oracle_view(odir, 3))
    passwd = next(r for r in rows if r["path"] == "/etc/passwd")
    assert passwd["what"] == "content" and passwd["sha256"] == oracle_view(odir, 3)["/etc/passwd"]["sha256"]
    assert passwd["old_sha256"] == oracle_view(odir, 2)["/etc/passwd"]["sha256"]
    r = run_cli("diff", "sample:1.0~4", "sample:1.0~3", "--stat", "--json", db_path=store)
    (stat,) = load_json_lines(r.stdout)
    changed = [x for x in rows if x["change"] == "C"]
    assert (stat["added"], stat["changed"], stat["deleted"]) == (
        sum(x["change"] == "A" for x in rows), len(changed), sum(x["change"] == "D" for x in rows))
    members = layer_members(SAMPLE)[2]
    assert stat["bytes_added"] == sum(e["size"] for e in members if e["type"] == "f")
    assert stat["bytes_removed"] == sum(x["old_size"] for x in changed)
    text = run_cli("diff", "sample:1.0~4", "sample:1.0~3", db_path=store).stdout.splitlines()
    assert any(line.startswith("C /etc/passwd  (content: ") for line in text)
    assert "A /etc/hostname" in text


@needs_shared
def test_metadata_only_change_is_its_own_kind(db):
    from layerdb.engine import audit

    db.import_archive(str(SHARED_FIXTURES / "images" / "fx-ops.oci.tar"), tag="ops:1")
    (row,) = [r for r in audit.diff(db, "ops:1~3", "ops:1~2") if r["path"] == "/srv/cfg/a.conf"]
    assert (row["change"], row["what"]) == ("C", "metadata")
    assert "mode" in row["fields"] and "sha256" not in row["fields"]


# find -----------------------------------------------------------------------------

def expected_finds(archive, oracle, ref, tag, match) -> set[tuple]:
    """(position, path, visible) for every layer-tar member that `match` accepts.

    A hard-link member shows its file as the oracle view at its position has it;
    visible: the oracle top view shows the same type and content at that path.
    """
    odir = oracle_dir(archive, oracle)
    positions = oracle_positions(odir)
    top = oracle_view(odir, max(positions))
    out = set()
    for n, members in enumerate(members_of(archive, ref, tag), 1):
        view = None
        for e in members:
            if is_whiteout(e) or e["path"] == "/":
                continue
            content = e
            if e["type"] == "h":
                view = view or oracle_view(odir, n)
                content = view[e["path"]]
            if not match(e, content):
                continue
            shown = top.get(e["path"])
            visible = shown is not None and shown["type"] == content["type"] and \
                shown.get("sha256") == content.get("sha256") and shown.get("link") == content.get("link")
            out.add((n, e["path"], visible))
    return out


def found(rows, image: str | None = None) -> set[tuple]:
    """(position, path, visible) of the rows, of one image (a multi-image archive holds several)."""
    return {(r["position"], r["path"], r["visible"]) for r in rows if image is None or r["image"] == image}


@pytest.mark.parametrize("archive,oracle,ref,tag", CASES)
def test_find_sha256_of_every_file_lists_exactly_the_layers_holding_it(stores, archive, oracle, ref, tag):
    from layerdb.engine import audit

    db = stores(archive, tag)
    image = db.resolve(ref).image_digest
    shas = {e["sha256"] for members in members_of(archive, ref, tag) for e in members
            if e["type"] == "f" and not is_whiteout(e)}
    assert shas
    for sha in sorted(shas):
        want = expected_finds(archive, oracle, ref, tag, lambda e, c: c.get("sha256") == sha)
        rows = audit.find(db, sha256=sha)
        assert found(rows, image) == want, sha
        assert {r["sha256"] for r in rows} == {sha}
        assert found(audit.find(db, sha256=sha, visible_only=True), image) == {w for w in want if w[2]}


@pytest.mark.parametrize("archive,oracle,ref,tag", CASES)
def test_find_by_name_and_path_globs(stores, archive, oracle, ref, tag):
    from layerdb.engine import audit

    db = stores(archive, tag)
    image = db.resolve(ref).image_digest
    names = sorted({e["name"] for members in members_of(archive, ref, tag) for e in members if not is_whiteout(e)})
    patterns = ["*.conf", "h?", "[!b]*", "*", names[len(names) // 2], names[-1][:2] + "*"]
    for pat in patterns:
        want = expected_finds(archive, oracle, ref, tag, lambda e, c: fnmatch.fnmatchcase(e["name"], pat))
        assert found(audit.find(db, name=pat), image) == want, pat
    for pat in ["/etc/*", "/srv/*", "/ln/*", "*/sub/*", "/a*/c*"]:
        want = expected_finds(archive, oracle, ref, tag, lambda e, c: fnmatch.fnmatchcase(e["path"], pat))
        assert found(audit.find(db, path=pat), image) == want, pat
    want = expected_finds(archive, oracle, ref, tag, lambda e, c: fnmatch.fnmatchcase(e["path"], "/etc/*")
                          and fnmatch.fnmatchcase(e["name"], "p*"))
    assert found(audit.find(db, name="p*", path="/etc/*"), image) == want


def test_find_across_images_shares_the_base_layer(tmp_path):
    store = tmp_path / "s.sqlite"
    for archive in (SAMPLE, SAMPLE2, OPAQUE):
        assert run_cli("import", str(archive), db_path=store).exit_code == 0
    base_passwd = oracle_view(REPO_FIXTURES / "oracle" / "sample", 1)["/etc/passwd"]["sha256"]
    rows = load_json_lines(run_cli("find", "--sha256", base_passwd, "--json", db_path=store).stdout)
    index = json.loads((REPO_FIXTURES / "oracle" / "sample" / "index.json").read_text())
    assert [(r["repo_tags"], r["position"], r["path"], r["visible"]) for r in rows] == [
        (["sample2:1.0"], 1, "/etc/passwd", False), (["sample:1.0"], 1, "/etc/passwd", False)]
    assert {r["layer_id"] for r in rows} == {index["layers"][0]["chain_id"]}
    for r in rows:
        assert set(r) >= {"image", "repo_tags", "position", "layer_id", "path", "type", "size", "sha256",
                          "created_by", "visible"}
        assert r["created_by"] == index["layers"][0]["created_by"]
    top2 = oracle_view(REPO_FIXTURES / "oracle" / "sample2", 3)["/etc/passwd"]["sha256"]
    rows = load_json_lines(run_cli("find", "--sha256", top2[:12], "--visible", "--json", db_path=store).stdout)
    assert [(r["repo_tags"], r["position"], r["visible"]) for r in rows] == [(["sample2:1.0"], 3, True)]
    both = load_json_lines(run_cli("find", "--sha256", top2, "--name", "pass*", "--path", "/etc/*", "--json",
                                   db_path=store).stdout)
    assert [(r["repo_tags"], r["position"]) for r in both] == [(["sample2:1.0"], 3)]
    assert run_cli("find", "--sha256", top2, "--name", "group", db_path=store).stdout.splitlines()[1:] == []
    assert run_cli("find", "--sha256", "xyz", db_path=store).exit_code == 2
    r = run_cli("find", db_path=store)
    assert r.exit_code == 2 and r.stderr == "layerdb: error: find needs --name, --path or --sha256\n"


def test_find_lookups_use_indexes(db):
    """EXPLAIN QUERY PLAN of every lookup find, log --all and diff run: no full scan of a table."""
    from layerdb.engine import audit, replay
    from layerdb.engine.audit import diffs as audit_diff, search as audit_find, timeline as audit_timeline

    db.import_archive(str(SAMPLE), tag="s:1")
    queries = [
        (audit_find.FIND_BLOB, (b"\0" * 32, b"\xff" * 32)),
        (audit_find.FIND_PUTS_ON.format("?,?"), (1, 2)),
        (audit_find.FIND_LINKS_TO.format("?,?"), (1, 2)),
        (audit_find.FIND_LAYERS, (1,)),
        (audit_find.FIND_IMAGES_ABOVE, (1,)),
        (audit_find.FIND_CREATED_BY, (1, 1)),
        (audit_timeline.LOG_DIFFS, (1,)),
        (audit_diff.SCOPE_EVENTS, (1,)),
        (replay.PATH_ID, (b"etc",)),
        (replay.SUBTREE, (b"etc/", b"etc0")),
        (replay.EVENTS_IN.format("?,?", "e.diff_id IN (?,?)"), (1, 2, 1, 2)),
        (replay.LINKS_IN.format("?,?", "e.diff_id IN (?,?)"), (1, 2, 1, 2)),
    ]
    for name, path in (("libssl.so*", None), (None, "/usr/lib/*"), ("lib*", "/usr/*"), ("x", None),
                       ("libssl.so*", "*/lib/*")):
        queries.append(audit.find_path_query(name, path))
    sql, args = audit_find.FIND_BLOB, (b"\0" * 32, b"\xff" * 32)
    where, extra = audit.path_filter("lib*", "/usr/*", "p.")
    queries.append((f"{sql} AND {where}", args + extra))
    for sql, args in queries:
        plan = [row[3] for row in db.store.execute("EXPLAIN QUERY PLAN " + sql, args)]
        assert any("USING" in step and ("INDEX" in step or "PRIMARY KEY" in step) for step in plan), (sql, plan)
        for step in plan:
            if step.startswith("SCAN"):
                # Only the recursive walk's seed row and queue may be scanned.
                assert step in ("SCAN up", "SCAN CONSTANT ROW"), (sql, plan)


def test_find_path_must_be_absolute(db):
    from layerdb.engine import audit
    from layerdb.engine.errors import UsageError

    with pytest.raises(UsageError):
        audit.find(db, path="etc/*")


# waste ------------------------------------------------------------------------------

def expected_waste(archive, oracle, ref, tag):
    """From the layer tars and the oracle views: what each layer ships that the top view does not show."""
    odir = oracle_dir(archive, oracle)
    layers = members_of(archive, ref, tag)
    top = len(layers)
    views = {n: oracle_view(odir, n) for n in range(0, top + 1)}
    files = []  # (path, position, size, sha256, wasted_by)
    cum: dict[str, int] = {}
    least: dict[str, int] = {}
    for n, members in enumerate(layers, 1):
        regular = [e for e in members if e["type"] == "f" and not is_whiteout(e)]
        for i, e in enumerate(regular):
            p = e["path"]
            cum[p] = cum.get(p, 0) + e["size"]
            least[p] = min(least.get(p, e["size"]), e["size"])
            by = None
            if any(x["path"] == p for x in regular[i + 1:]):
                by = n  # the same path again later in the same tar
            for m in range(n + 1, top + 1):
                if by is not None:
                    break
                named = any(x["path"] == p for x in layers[m - 1] if not is_whiteout(x))
                shown = views[m].get(p)
                if named or shown is None or shown.get("sha256") != e["sha256"]:
                    by = m
            files.append((p, n, e["size"], e["sha256"], by))
        # A file that leaves its path without a new regular file there counts as a size 0 (dive).
        for p in list(least):
            was, now = views[n - 1].get(p), views[n].get(p)
            reput = any(e["path"] == p for e in regular)
            link_over = any(e["path"] == p and e["type"] != "f" and not is_whiteout(e) for e in members)
            if was is not None and was["type"] == "f" and not reput and (
                    now is None or now["type"] != "f" or link_over):
                least[p] = 0
    total = sum(cum.values())
    return files, total, (sum(least.values()) / total if total else 1.0)


@pytest.mark.parametrize("partition", [None, 1, 3], ids=["whole", "partitions-of-1", "partitions-of-3"])
@pytest.mark.parametrize("archive,oracle,ref,tag", CASES)
def test_waste_matches_layer_tars_and_oracle(stores, archive, oracle, ref, tag, partition, monkeypatch):
    """Also when a large image's analysis runs partition by partition (forced tiny here)."""
    from layerdb.engine import audit

    db = stores(archive, tag)
    files, total, efficiency = expected_waste(archive, oracle, ref, tag)
    replaying(monkeypatch, partition)
    rep = audit.waste(db, ref)
    own = rep["own"]
    assert own["total_bytes"] == total
    assert own["efficiency"] == pytest.approx(efficiency, abs=1e-12)
    wasted = sorted((f[0], f[1], f[2], f[3], f[4]) for f in files if f[4] is not None)
    got = sorted((f["path"], f["position"], f["size"], f["sha256"], f["wasted_by"]) for f in rep["files"])
    assert got == wasted
    per_layer = {li["position"]: li["wasted_bytes"] for li in rep["layers"]}
    assert per_layer == {n: sum(f[2] for f in wasted if f[1] == n) for n in per_layer}
    assert own["wasted_bytes"] == sum(f[2] for f in wasted)
    assert [li["size"] for li in rep["layers"]] == [
        sum(e["size"] for e in members if e["type"] == "f") for members in members_of(archive, ref, tag)]
    user, share = expected_user_share(archive, ref, tag, sum(f[2] for f in wasted))
    assert (rep["user_bytes"], own["user_wasted_percent"]) == (user, share)
    # The top-level figures are dive's: the literal model of dive's rules over the layer tars.
    (want,) = [dive_score(*trees_of(layers)) for digest, layers in images_of(archive) if digest == rep["image"]]
    assert (rep["efficiency"], rep["wasted_bytes"], rep["size_bytes"], rep["user_bytes"],
            rep["user_wasted_percent"]) == (want["efficiency"], want["wasted_bytes"], want["size_bytes"],
                                            want["user_size_bytes"], want["wasted_user_percent"])
    assert len(want["inefficient"]) <= 20  # the fixtures' lists are whole: waste lists dive's top 20
    assert {(i["path"], i["count"], i["size"]) for i in rep["inefficiencies"]} == {
        (p.decode("utf-8", "surrogateescape"), n, size) for p, n, size in want["inefficient"]}


def expected_user_share(archive, ref, tag, wasted: int) -> tuple[int, float | None]:
    """dive's user bytes (the header sizes of every entry of every layer tar but the first) and the
    wasted bytes as a fraction of them; None without user bytes (dive's NaN or +Inf)."""
    user = sum(e["size"] for members in members_of(archive, ref, tag)[1:] for e in members)
    return user, (wasted / user if user else None)


def test_waste_names_the_layer_that_wasted_each_file(db):
    from layerdb.engine import audit

    db.import_archive(str(SAMPLE), tag="s:1")
    rep = audit.waste(db, "s:1")
    by_path = {f["path"]: f for f in rep["files"]}
    index = json.loads((REPO_FIXTURES / "oracle" / "sample" / "index.json").read_text())
    assert by_path["/app/docs/README.txt"]["how"] == "deleted"
    assert by_path["/app/docs/README.txt"]["wasted_by_created_by"] == index["layers"][3]["created_by"]
    assert by_path["/etc/passwd"]["how"] == "overwritten" and by_path["/etc/passwd"]["wasted_by"] == 3
    # app/version.txt is a hard link to app/VERSION: one file, shipped once, visible: no waste
    assert "/app/VERSION" not in by_path


def test_waste_ci_thresholds_set_the_exit_code(tmp_path):
    store = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=store).exit_code == 0
    (rep,) = load_json_lines(run_cli("waste", "sample:1.0", "--json", db_path=store).stdout)
    ok = run_cli("waste", "sample:1.0", "--ci", "--lowest-efficiency", "0.5", "--highest-wasted-bytes", "1kB",
                 "--highest-user-wasted-percent", "0.7", db_path=store)
    assert ok.exit_code == 0 and ok.stderr == ""
    bad = run_cli("waste", "sample:1.0", "--ci", "--highest-wasted-bytes", str(rep["wasted_bytes"] - 1),
                  "--highest-user-wasted-percent", "1", db_path=store)
    assert bad.exit_code == 1
    assert bad.stderr == (f"layerdb: error: waste check failed: wasted bytes {rep['wasted_bytes']} exceed "
                          f"{rep['wasted_bytes'] - 1}\n")
    assert "Efficiency:" in bad.stdout
    bad = run_cli("waste", "sample:1.0", "--ci", "--lowest-efficiency", "1", "--highest-user-wasted-percent", "1",
                  db_path=store)
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1 and "efficiency" in bad.stderr
    assert run_cli("waste", "sample:1.0", "--lowest-efficiency", "0.5", db_path=store).exit_code == 2
    assert run_cli("waste", "sample:1.0", "--ci", "--lowest-efficiency", "2", db_path=store).exit_code == 2


def test_waste_user_wasted_percent_and_its_ci_rule(tmp_path):
    """dive's third rule: wasted bytes over the user bytes (every layer but the base), 0.1 by default."""
    store = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=store).exit_code == 0
    files, _, _ = expected_waste(SAMPLE, "sample", "sample:1.0", None)
    own = sum(f[2] for f in files if f[4] is not None)
    (layers,) = [layers for _, layers in images_of(SAMPLE)]
    dive = dive_score(*trees_of(layers))
    wasted, user, share = dive["wasted_bytes"], dive["user_size_bytes"], dive["wasted_user_percent"]
    # dive counts every byte of a path named twice (372); layerdb's own count, what the top view
    # does not show, is 244.  Layers 2..6 ship 361 + 183 + 0 + 67 + 2 file bytes.
    assert (wasted, own, user) == (372, 244, 613)
    (rep,) = load_json_lines(run_cli("waste", "sample:1.0", "--json", db_path=store).stdout)
    assert (rep["wasted_bytes"], rep["user_bytes"], rep["user_wasted_percent"]) == (wasted, user, share)
    assert (rep["own"]["wasted_bytes"], rep["own"]["user_wasted_percent"]) == (own, own / user)
    table = run_cli("waste", "sample:1.0", db_path=store).stdout
    assert f"User wasted: {share * 100:.4f} % of the 613B of every layer but the first\n" in table
    assert "Not in the top view: 244B shipped by a layer and overwritten or deleted later" in table

    # dive fails when the threshold is below the share: at the share itself it passes.
    at = run_cli("waste", "sample:1.0", "--ci", "--lowest-efficiency", "0", "--highest-user-wasted-percent",
                 repr(share), db_path=store)
    assert at.exit_code == 0, at.stderr
    below = run_cli("waste", "sample:1.0", "--ci", "--lowest-efficiency", "0", "--highest-user-wasted-percent",
                    "0.606", db_path=store)
    assert below.exit_code == 1
    assert below.stderr == ("layerdb: error: waste check failed: wasted bytes are 0.6069 of the user bytes, "
                            "above 0.606\n")
    default = run_cli("waste", "sample:1.0", "--ci", "--lowest-efficiency", "0", db_path=store)  # 0.1, as dive
    assert default.exit_code == 1 and "above 0.1\n" in default.stderr
    assert run_cli("waste", "sample:1.0", "--highest-user-wasted-percent", "0.5", db_path=store).exit_code == 2
    r = run_cli("waste", "sample:1.0", "--ci", "--highest-user-wasted-percent", "1.5", db_path=store)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "between 0 and 1" in r.stderr


def _one_layer_archive(path, files: list[tuple[str, bytes]]) -> None:
    """A docker-save archive of one image of one layer holding `files` in that order (names may repeat)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            t.addfile(ti, io.BytesIO(data))
    layer = layer.getvalue()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
                         "history": [{"created_by": "one layer"}]}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["one:1"], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as t:
        for name, data in (("layer.tar", layer), (config_name, config), ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


@pytest.mark.parametrize("files,own", [
    ([("a", b"12345")], 0),
    # The same path twice in one tar: dive's tree of the layer holds it once, so dive sees no
    # waste; layerdb's own count has the 5 bytes the second entry hides.
    ([("a", b"12345"), ("a", b"678")], 5),
])
def test_waste_user_share_of_a_one_layer_image(tmp_path, files, own):
    """dive's ratio is 0 / 0 = NaN for a one-layer image, and NaN above the threshold is false: it passes."""
    archive, store = tmp_path / "one.tar", tmp_path / "s.sqlite"
    _one_layer_archive(archive, files)
    (layers,) = [layers for _, layers in images_of(archive)]
    dive = dive_score(*trees_of(layers))
    assert (dive["wasted_bytes"], dive["user_size_bytes"]) == (0, 0)
    assert run_cli("import", str(archive), db_path=store).exit_code == 0
    (rep,) = load_json_lines(run_cli("waste", "one:1", "--json", db_path=store).stdout)
    assert (rep["wasted_bytes"], rep["user_bytes"], rep["user_wasted_percent"]) == (0, 0, None)
    assert (rep["own"]["wasted_bytes"], rep["own"]["user_wasted_percent"]) == (own, None)
    assert "User wasted: - of the 0B of every layer but the first" in run_cli("waste", "one:1", db_path=store).stdout
    r = run_cli("waste", "one:1", "--ci", "--lowest-efficiency", "0", db_path=store)
    assert r.exit_code == 0, r.stderr


# log --all, -p, --at-version ---------------------------------------------------------------

def test_log_all_gives_one_timeline_per_image_and_marks_shared_layers(db):
    for archive in (SAMPLE, SAMPLE2, OPAQUE):
        db.import_archive(str(archive))
    rows = db.log("/etc/passwd", all_images=True)
    for label, oracle in (("sample:1.0", "sample"), ("sample2:1.0", "sample2")):
        mine = [r for r in rows if r["image"] == label]
        want = oracle_timeline(REPO_FIXTURES / "oracle" / oracle, "/etc/passwd")
        assert [(r["position"], r["op"], r["sha256"]) for r in mine] == [
            (p, op, e["sha256"]) for p, op, e in want]
        assert [r["version"] for r in mine] == list(range(1, len(mine) + 1))
        other = "sample2:1.0" if label == "sample:1.0" else "sample:1.0"
        assert [r["shared_with"] for r in mine] == [[other] if r["position"] == 1 else [] for r in mine]
    assert {r["image"] for r in rows} == {"sample:1.0", "sample2:1.0"}  # opaque never had the path


def test_log_all_of_a_path_no_image_held_is_an_error(tmp_path):
    store = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=store).exit_code == 0
    r = run_cli("log", "/no/such/file", "--all", db_path=store)
    assert r.exit_code == 5 and r.stderr == "layerdb: error: /no/such/file: no stored image ever held this path\n"
    r = run_cli("log", "/etc/passwd", "--all", "--image", "sample:1.0", db_path=store)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1


def test_log_all_includes_deletions_that_do_not_name_the_path(db):
    for archive in (SAMPLE, SAMPLE2):
        db.import_archive(str(archive))
    rows = db.log("/app/docs/README.txt", all_images=True)
    assert [(r["image"], r["position"], r["op"], r["via"]) for r in rows] == [
        ("sample:1.0", 2, "add", None), ("sample:1.0", 4, "delete", "parent-whiteout")]


def _tar_file(archive, position, path) -> bytes:
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))
        manifest = json.load(outer.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:]))
        name = "blobs/sha256/" + manifest["layers"][position - 1]["digest"][7:]
        with tarfile.open(fileobj=io.BytesIO(_layer_bytes(outer, name))) as t:
            for m in t:
                if _norm(m.name) == path:
                    return t.extractfile(m).read()
    raise KeyError(path)


def test_log_patch_is_a_unified_diff_of_the_layer_contents(tmp_path):
    store = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=store).exit_code == 0
    rows = load_json_lines(run_cli("log", "/etc/passwd", "-p", "--json", db_path=store).stdout)
    v1, v2 = (_tar_file(SAMPLE, pos, "/etc/passwd").decode() for pos in (1, 3))
    assert rows[0]["patch"] == "".join(difflib.unified_diff([], v1.splitlines(True), "/dev/null", "b/etc/passwd"))
    assert rows[1]["patch"] == "".join(difflib.unified_diff(v1.splitlines(True), v2.splitlines(True),
                                                            "a/etc/passwd", "b/etc/passwd"))
    assert "+app:x:1000:1000:demo app:/app:/bin/sh\n" in rows[1]["patch"]
    rows = load_json_lines(run_cli("log", "/bin/busybox", "-p", "--json", db_path=store).stdout)
    assert rows[0]["patch"] == "Binary files /dev/null and b/bin/busybox differ\n"
    rows = load_json_lines(run_cli("log", "/app/docs/README.txt", "-p", "--json", db_path=store).stdout)
    readme = _tar_file(SAMPLE, 2, "/app/docs/README.txt").decode()
    assert rows[1]["patch"] == "".join(difflib.unified_diff(readme.splitlines(True), [], "a/app/docs/README.txt",
                                                            "/dev/null"))
    text = run_cli("log", "/etc/passwd", "-p", db_path=store).stdout
    assert text.count("version ") == 2 and "+app:x:1000:1000:demo app:/app:/bin/sh" in text


@needs_shared
def test_log_patch_of_a_chmod_and_of_a_symlink_retarget(db):
    db.import_archive(str(SHARED_FIXTURES / "images" / "fx-ops.oci.tar"), tag="ops:1")
    rows = db.log("/srv/cfg/a.conf", image="ops:1", patch=True)
    assert rows[1]["op"] == "modify" and rows[1]["patch"] == "old mode 0644\nnew mode 0640\n"
    db.import_archive(str(SHARED_FIXTURES / "images" / "fx-history.oci-zstd.tar"), tag="h:1")
    rows = db.log("/var/fx/newest", image="h:1", patch=True)
    assert rows[1]["patch"].endswith("-item-05\n\\ No newline at end of file\n+item-10\n\\ No newline at end of file\n")


def test_log_at_version_writes_that_version(tmp_path):
    store = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=store).exit_code == 0
    want = oracle_timeline(REPO_FIXTURES / "oracle" / "sample", "/etc/passwd")
    for n, (_, _, e) in enumerate(want, 1):
        r = run_cli("log", "/etc/passwd", "--at-version", str(n), db_path=store)
        assert r.exit_code == 0 and hashlib.sha256(r.stdout_bytes).hexdigest() == e["sha256"]
    r = run_cli("log", "/etc/passwd", "--at-version", "3", db_path=store)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    r = run_cli("log", "/app/old.log", "--at-version", "2", db_path=store)
    assert r.exit_code == 5 and "deletion" in r.stderr
    table = run_cli("log", "/etc/passwd", db_path=store).stdout.splitlines()
    assert table[0].split()[:2] == ["#", "POS"] and table[2].split()[:2] == ["2", "3"]


def test_history_changes_cli(tmp_path):
    store = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=store).exit_code == 0
    rows = load_json_lines(run_cli("history", "sample:1.0", "--changes", "--json", db_path=store).stdout)
    odir = REPO_FIXTURES / "oracle" / "sample"
    for n in range(1, 7):
        assert got_diff(r for r in rows if r["position"] == n) == oracle_diff(oracle_view(odir, n - 1),
                                                                              oracle_view(odir, n))
    assert set(rows[0]) >= {"position", "layer_id", "created_by", "path", "change", "what"}
    text = run_cli("history", "sample:1.0", "--changes", db_path=store).stdout
    assert "  D /app/docs/README.txt\n" in text and "  C /etc/passwd  (content:" in text
