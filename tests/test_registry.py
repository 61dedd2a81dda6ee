"""pull, push, login and logout against real registries (CNCF distribution 2.8).

The registries, a token server and a fault proxy start once per test process
(tests/registry_env.py); images get there with skopeo, and the views layerdb
pulls are compared with the fixtures' oracles.  Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import (REPO_FIXTURES, SHARED_FIXTURES, export_bytes, manifest_of_tar_bytes, oracle_lines,
                      oracle_positions, run_cli, store_dump)

import registry_env as R
from registry_env import INSECURE, MULTI, OPAQUE, ORACLE, SAMPLE, SAMPLE2, SAMPLE_DOCKER

pytestmark = R.NEEDS
regs = R.regs  # the shared registries, a session fixture


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store.sqlite"


def _db(path):
    from layerdb.engine.api import LayerDB

    return LayerDB(path)


def _views_match(db, ref, oracle_dir, tmp_path):
    positions = oracle_positions(oracle_dir)
    top = max(positions)
    assert db.resolve(ref).position == top
    for pos in positions:
        got = manifest_of_tar_bytes(export_bytes(db, f"{ref}~{top - pos}"), tmp_path)
        assert got == oracle_lines(oracle_dir, pos), f"{ref} position {pos} differs from the oracle"


def _blob_gets(reg, mark):
    return sorted(p.rsplit("/", 1)[1] for m, p, s in reg.since(mark) if m == "GET" and "/blobs/" in p and s in (200, 206))


def _pull(store, *args):
    return run_cli("pull", "-q", *args, db_path=store)


# Pull -----------------------------------------------------------------------------


def test_pull_views_match_the_oracle_and_tag_is_the_full_reference(regs, store, tmp_path):
    ref = R.seed(regs["plain"], f"oci-archive:{SAMPLE}", "fx/sample:1.0")
    r = run_cli("pull", *INSECURE, ref, "--tag", "demo:1", "--json", db_path=store)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["id"] == ORACLE["sample"]["config_digest"]
    assert out["manifest"] == ORACLE["sample"]["manifest_digest"]  # skopeo kept the archive's digest
    assert out["layers_fetched"] == 6 and out["layers_skipped"] == 0
    with _db(store) as db:
        assert set(db.images()[0]["repo_tags"]) == {ref, "demo:1"}
        _views_match(db, ref, REPO_FIXTURES / "oracle" / "sample", tmp_path)
        # What the store kept for a push: the manifest bytes and every layer's descriptor.
        data, mt = db.store.one("SELECT data, media_type FROM manifest WHERE digest = ?",
                                (ORACLE["sample"]["manifest_digest"],))
        assert mt == "application/vnd.oci.image.manifest.v1+json"
        layers = [(d, s) for d, s in db.store.execute("SELECT digest, size FROM manifest_layer ORDER BY idx")]
        assert layers == [(x["digest"], x["compressed_size"]) for x in ORACLE["sample"]["layers"]]
        assert json.loads(data)["layers"][0]["digest"] == layers[0][0]
        host, repo = ref.split("/", 1)
        assert db.store.scalar("SELECT count(*) FROM seen WHERE registry = ? AND repository = ?",
                               (host, "fx/sample")) == 8  # manifest, config, 6 layers


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="../shared/fixtures is not beside the checkout")
@pytest.mark.parametrize("name", ["fx-ops.oci.tar", "hc-opaque.oci.tar", "fx-history.oci-zstd.tar", "fx-links.docker25.tar"])
def test_pull_shared_fixtures_match_their_oracles(regs, store, tmp_path, name):
    archive = SHARED_FIXTURES / "images" / name
    oracle = SHARED_FIXTURES / "oracle" / name.split(".")[0]
    kind = "docker-archive" if "docker" in name else "oci-archive"
    ref = R.seed(regs["plain"], f"{kind}:{archive}", f"shared/{name.split('.')[0]}:t")
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code == 0, r.output
    with _db(store) as db:
        _views_match(db, ref, oracle, tmp_path)
        img = db.images()[0]
        cfg = db.store.scalar("SELECT config FROM image WHERE digest = ?", (img["id"],))
        import hashlib

        assert img["id"] == "sha256:" + hashlib.sha256(cfg).hexdigest()


def test_second_pull_fetches_only_the_blobs_it_lacks(regs, store):
    plain = regs["plain"]
    a = R.seed(plain, f"oci-archive:{SAMPLE}", "fx/sample:1.0")
    b = R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    mark = plain.mark()
    assert _pull(store, *INSECURE, a).exit_code == 0
    first = _blob_gets(plain, mark)
    sample_blobs = {x["digest"] for x in ORACLE["sample"]["layers"]} | {ORACLE["sample"]["config_digest"]}
    assert set(first) == sample_blobs and len(first) == 7
    mark = plain.mark()
    r = run_cli("pull", *INSECURE, b, "--json", db_path=store)
    out = json.loads(r.stdout.splitlines()[-1])
    s2 = ORACLE["sample2"]
    missing = [x["digest"] for x in s2["layers"] if x["digest"] not in sample_blobs]
    assert _blob_gets(plain, mark) == sorted(missing + [s2["config_digest"]])
    assert out["layers_skipped"] == 1 and out["layers_fetched"] == len(missing)
    # A third pull of a stored image fetches the manifest and the config only.
    mark = plain.mark()
    assert _pull(store, *INSECURE, a).exit_code == 0
    assert _blob_gets(plain, mark) == [ORACLE["sample"]["config_digest"]]


def test_pull_by_digest_and_tag_at_digest(regs, store):
    ref = R.seed(regs["plain"], f"oci-archive:{SAMPLE}", "fx/sample:1.0")
    name = ref.rsplit(":", 1)[0]
    d = ORACLE["sample"]["manifest_digest"]
    assert _pull(store, *INSECURE, f"{name}@{d}").exit_code == 0
    assert _pull(store, *INSECURE, f"{name}:other@{d}").exit_code == 0
    with _db(store) as db:
        assert set(db.images()[0]["repo_tags"]) == {f"{name}@{d}", f"{name}:other"}
    bad = "sha256:" + "0" * 64
    r = _pull(store, *INSECURE, f"{name}@{bad}")
    assert r.exit_code == 5 and "not found" in r.stderr and len(r.stderr.splitlines()) == 1


def test_multi_platform_index(regs, tmp_path):
    ref = R.seed(regs["plain"], f"oci-archive:{MULTI}:multi:1.0", "fx/multi:1.0", "--all")
    s = tmp_path / "a.sqlite"
    r = run_cli("pull", "-q", *INSECURE, "--platform", "linux/arm64", ref, "--json", db_path=s)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["id"] == ORACLE["opaque"]["config_digest"]
    r = run_cli("pull", "-q", *INSECURE, "--platform", "linux/amd64", ref, "--json", db_path=s)
    assert json.loads(r.stdout)["id"] == ORACLE["sample"]["config_digest"]
    with _db(s) as db:
        assert db.resolve(ref).image_digest == ORACLE["sample"]["config_digest"]
    s2 = tmp_path / "b.sqlite"
    r = run_cli("pull", "-q", *INSECURE, "--all-platforms", ref, "--json", db_path=s2)
    assert sorted(json.loads(x)["id"] for x in r.stdout.splitlines()) == sorted(
        [ORACLE["opaque"]["config_digest"], ORACLE["sample"]["config_digest"]])
    with _db(s2) as db:
        assert db.store.scalar("SELECT count(*) FROM manifest WHERE image_id IS NULL") == 1  # the index
        assert db.store.scalar("SELECT count(*) FROM manifest_child") == 2
    r = run_cli("pull", "-q", *INSECURE, "--platform", "linux/s390x", ref, db_path=tmp_path / "c.sqlite")
    assert r.exit_code != 0 and "no image for platform linux/s390x (has linux/amd64, linux/arm64/v8)" in r.stderr


# TLS, htpasswd, tokens, credentials ---------------------------------------------------


def test_tls_and_htpasswd(regs, store, tmp_path):
    tls = regs["tls"]
    ref = R.seed(tls, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    before = None
    r = _pull(store, ref, "--creds", f"{R.USER}:{R.PASSWORD}")
    assert r.exit_code == 7 and "--cert-dir" in r.stderr and "--tls-verify=false" in r.stderr
    assert "s3cret" not in r.stderr and len(r.stderr.splitlines()) == 1
    before = store_dump(store)
    r = _pull(store, ref, "--cert-dir", str(tls.ca))
    assert r.exit_code == 8 and "authentication required" in r.stderr
    r = _pull(store, ref, "--cert-dir", str(tls.ca), "--creds", f"{R.USER}:wrong-password-42")
    assert r.exit_code == 8 and "'alice'" in r.stderr and "wrong-password-42" not in r.stderr
    assert store_dump(store) == before
    r = _pull(store, ref, "--cert-dir", str(tls.ca), "--creds", f"{R.USER}:{R.PASSWORD}")
    assert r.exit_code == 0, r.output
    # --tls-verify=false accepts the self-signed certificate.
    r = _pull(tmp_path / "other.sqlite", ref, *INSECURE, "--creds", f"{R.USER}:{R.PASSWORD}")
    assert r.exit_code == 0, r.output


def test_login_logout_and_authfile(regs, store, tmp_path, monkeypatch):
    tls = regs["tls"]
    ref = R.seed(tls, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    auth = tmp_path / "auth.json"
    r = run_cli("login", "--authfile", str(auth), "--cert-dir", str(tls.ca), "-u", R.USER, "--password-stdin",
                tls.host, input=b"not-the-password\n")
    assert r.exit_code == 8 and "not-the-password" not in r.output and not auth.exists()
    r = run_cli("login", "--authfile", str(auth), "--cert-dir", str(tls.ca), "-u", R.USER, "--password-stdin",
                tls.host, input=f"{R.PASSWORD}\n".encode())
    assert r.exit_code == 0, r.output
    assert oct(auth.stat().st_mode & 0o777) == "0o600"
    import base64

    assert json.loads(auth.read_text()) == {
        "auths": {tls.host: {"auth": base64.b64encode(f"{R.USER}:{R.PASSWORD}".encode()).decode()}}}
    assert _pull(store, ref, "--cert-dir", str(tls.ca), "--authfile", str(auth)).exit_code == 0
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    assert _pull(tmp_path / "s2.sqlite", ref, "--cert-dir", str(tls.ca)).exit_code == 0
    r = run_cli("logout", "--authfile", str(auth), tls.host)
    assert r.exit_code == 0 and json.loads(auth.read_text()) == {"auths": {}}
    r = run_cli("logout", "--authfile", str(auth), tls.host)
    assert r.exit_code == 5 and "not logged in" in r.stderr


def test_credential_helper_against_the_registry(regs, store, tmp_path, monkeypatch):
    tls = regs["tls"]
    ref = R.seed(tls, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-ldbtest"
    helper.write_text(f'#!/bin/sh\nread s\n[ "$s" = "{tls.host}" ] || exit 1\n'
                      f'echo \'{{"ServerURL":"{tls.host}","Username":"{R.USER}","Secret":"{R.PASSWORD}"}}\'\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"credHelpers": {tls.host: "ldbtest"}}))
    r = _pull(store, ref, "--cert-dir", str(tls.ca), "--authfile", str(cfg))
    assert r.exit_code == 0, r.output


def test_token_auth(regs, store, tmp_path):
    tok, ts = regs["token"], regs["tokens"]
    ref = R.seed(tok, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    n = len(ts.requests)
    assert _pull(store, *INSECURE, ref).exit_code == 0  # anonymous token, pull scope
    got = ts.requests[n:]
    assert got and all(q["user"] is None for q in got)
    assert any("repository:fx/sample2:pull" in q["scopes"] for q in got)
    # Anonymous push is denied by the token server's grant; one line, nothing leaked.
    r = run_cli("push", "-q", *INSECURE, ref, f"{tok.host}/fx/pushed:1", db_path=store)
    assert r.exit_code == 8 and len(r.stderr.splitlines()) == 1
    r = run_cli("push", "-q", *INSECURE, "--creds", f"{R.USER}:{R.PASSWORD}", ref, f"{tok.host}/fx/pushed:1",
                db_path=store)
    assert r.exit_code == 0, r.output
    assert any(q["user"] == R.USER and "repository:fx/pushed:pull,push" in q["scopes"] for q in ts.requests[n:])
    r = run_cli("push", "-q", *INSECURE, "--creds", f"{R.USER}:nope-secret", ref, f"{tok.host}/fx/pushed:2",
                db_path=store)
    assert r.exit_code == 8 and "token server refused user 'alice'" in r.stderr and "nope-secret" not in r.stderr


def test_expired_token_is_renewed_mid_pull(regs, store):
    tok, ts = regs["token"], regs["tokens"]
    ref = R.seed(tok, f"oci-archive:{SAMPLE}", "fx/sample:1.0")
    mark = tok.mark()
    ts.expired_next = 1  # the registry refuses the first token it is shown
    n = len(ts.requests)
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code == 0, r.output
    assert len(ts.requests) - n == 2
    statuses = [s for m, p, s in tok.since(mark) if "/manifests/" in p]
    assert statuses == [401, 200]


# Faults: the proxy in front of the plain registry ----------------------------------------


def _via_proxy(regs, repo="fx/sample:1.0", archive=SAMPLE):
    R.seed(regs["plain"], f"oci-archive:{archive}", repo)
    proxy = regs["proxy"]
    proxy.clear()
    return proxy, f"{proxy.host}/{repo}"


def test_dropped_connection_resumes_with_range(regs, store, tmp_path):
    proxy, ref = _via_proxy(regs)
    big = ORACLE["sample"]["layers"][0]["digest"]
    proxy.add(R.Fault("drop", match=big, at=300_000, times=2))
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code == 0, r.output
    gets = [(s, k) for m, p, s, k in proxy.log if big in p]
    assert gets == [(200, "drop"), (206, "drop"), (206, "pass")]
    with _db(store) as db:
        _views_match(db, ref, REPO_FIXTURES / "oracle" / "sample", tmp_path)


def test_range_ignored_restarts_the_blob(regs, store):
    proxy, ref = _via_proxy(regs)
    big = ORACLE["sample"]["layers"][0]["digest"]
    proxy.add(R.Fault("drop", match=big, at=200_000), R.Fault("ignore-range", match=big))
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code == 0, r.output
    assert [(s, k) for m, p, s, k in proxy.log if big in p] == [(200, "drop"), (200, "ignore-range")]


def test_429_honours_retry_after(regs, store):
    proxy, ref = _via_proxy(regs)
    proxy.add(R.Fault("429", match="/manifests/", retry_after="1", times=1))
    t = time.monotonic()
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code == 0, r.output
    assert time.monotonic() - t >= 1.0
    assert [s for m, p, s, k in proxy.log if "/manifests/" in p] == [429, 200]


def test_429_after_the_retries_is_one_line(regs, store, monkeypatch):
    from layerdb.engine.registry import client

    monkeypatch.setattr(client, "RETRIES", 2)
    proxy, ref = _via_proxy(regs)
    proxy.add(R.Fault("429", match="/manifests/", retry_after="0", times=10))
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code == 7 and "too many requests (429)" in r.stderr and len(r.stderr.splitlines()) == 1
    assert len([1 for m, p, s, k in proxy.log if "/manifests/" in p]) == 3


@pytest.mark.parametrize("kind,message", [
    ("corrupt", "digest mismatch"),
    ("endless", "more than its declared"),
    ("loop", "more than 10 redirects"),
])
def test_bad_bodies_leave_the_store_unchanged(regs, store, kind, message):
    proxy, ref = _via_proxy(regs)
    # A first pull of something else, so "unchanged" is about a store with content.
    other = R.seed(regs["plain"], f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    assert _pull(store, *INSECURE, other).exit_code == 0
    before = store_dump(store)
    layer = ORACLE["sample"]["layers"][3]["digest"]
    proxy.add(R.Fault(kind, match=layer, at=10, times=100))
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code != 0 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    if kind != "loop":
        assert layer in r.stderr  # the blob is named
    assert store_dump(store) == before


def test_a_blob_with_the_right_tar_inside_is_still_checked_against_its_digest(regs, store):
    """The download no longer hashes layers (the importer's LayerStream does): a
    flipped gzip MTIME byte leaves the tar, and so the diff_id, as it was, and only
    the blob digest can tell; the blob is named and nothing is stored."""
    proxy, ref = _via_proxy(regs)
    assert _pull(store, *INSECURE, R.seed(regs["plain"], f"oci-archive:{SAMPLE2}", "fx/sample2:1")).exit_code == 0
    before = store_dump(store)
    layer = ORACLE["sample"]["layers"][2]["digest"]
    proxy.add(R.Fault("corrupt", match=layer, at=4, times=100))
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code == 4 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"blob {layer}: digest mismatch: expected {layer}, got sha256:" in r.stderr
    assert store_dump(store) == before
    assert [k for m, p, s, k in proxy.log if layer in p] == ["corrupt"]


def test_a_resumed_blob_is_verified_as_a_whole(regs, store):
    """A body damaged after a resume (206) is caught: the digest covers both parts."""
    proxy, ref = _via_proxy(regs)
    big = ORACLE["sample"]["layers"][0]["digest"]
    proxy.add(R.Fault("drop", match=big, at=300_000), R.Fault("corrupt", match=big, at=5000))
    r = _pull(store, *INSECURE, ref)
    assert r.exit_code == 4 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"blob {big}: digest mismatch" in r.stderr
    assert [(s, k) for m, p, s, k in proxy.log if big in p] == [(200, "drop"), (206, "corrupt")]
    with _db(store) as db:
        assert db.images() == [] and db.store.scalar("SELECT count(*) FROM diff") == 0


def _put_blob(host, repo, data):
    """A blob into the registry by hand (POST, then PUT with the digest): no tool recompresses it."""
    import hashlib
    import http.client
    from urllib.parse import urlsplit

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    c = http.client.HTTPConnection(host)
    c.request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    r = c.getresponse()
    r.read()
    assert r.status == 202, r.status
    loc = urlsplit(r.getheader("Location"))
    c.request("PUT", f"{loc.path}?{loc.query}{'&' if loc.query else ''}digest={digest}", body=data,
              headers={"Content-Type": "application/octet-stream"})
    r = c.getresponse()
    r.read()
    assert r.status == 201, r.status
    return digest


def _twin_blobs():
    """One tar gzipped twice (level 9, then level 1): (diff_id, [blob 1, blob 2])."""
    import gzip
    import hashlib
    import io
    import random
    import tarfile

    buf = io.BytesIO()
    rnd = random.Random(13)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for i in range(4):
            data = bytes(rnd.getrandbits(8) for _ in range(20_000)) + b"layerdb " * 5000
            info = tarfile.TarInfo(f"twin/file{i}")
            info.size, info.mtime = len(data), 1_700_000_000
            t.addfile(info, io.BytesIO(data))
    tar = buf.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    blobs = [gzip.compress(tar, compresslevel=9, mtime=0), gzip.compress(tar, compresslevel=1, mtime=0)]
    assert blobs[0] != blobs[1]
    return diff_id, blobs


def _twin_layer_image(host, repo, tag):
    """An image whose two layers are _twin_blobs(): (blob 1, blob 2, diff_id), as digests."""
    diff_id, blobs = _twin_blobs()
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [diff_id, diff_id]},
                      "history": [{"created_by": "twin 1"}, {"created_by": "twin 2"}]}).encode()
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _put_blob(host, repo, b),
               "size": len(b)} for b in blobs]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _put_blob(host, repo, cfg), "size": len(cfg)},
                "layers": layers}
    import http.client

    c = http.client.HTTPConnection(host)
    c.request("PUT", f"/v2/{repo}/manifests/{tag}", body=json.dumps(manifest).encode(),
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    r = c.getresponse()
    r.read()
    assert r.status == 201, r.status
    return layers[0]["digest"], layers[1]["digest"], diff_id


def test_two_blobs_of_one_diff_id_and_a_damaged_one(regs, store):
    """Each downloaded blob is hashed once, by the importer, and never accepted
    unverified: the first blob of a diff_id, served with a flipped gzip MTIME byte
    (the same tar inside, so only its digest can tell), fails the pull and the store
    is unchanged.  The second blob of that diff_id is not downloaded at all (a
    layer whose diff_id the pull has is not fetched), so damage to it is never seen."""
    plain, proxy = regs["plain"], regs["proxy"]
    b1, b2, diff_id = _twin_layer_image(plain.host, "fx/twin", "1")
    assert _pull(store, *INSECURE, R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")).exit_code == 0
    before = store_dump(store)
    proxy.clear()
    proxy.add(R.Fault("corrupt", match=b1, at=4, times=100))
    r = _pull(store, *INSECURE, f"{proxy.host}/fx/twin:1")
    assert r.exit_code == 4 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"blob {b1}: digest mismatch: expected {b1}, got sha256:" in r.stderr
    assert store_dump(store) == before
    assert [k for m, p, s, k in proxy.log if "/blobs/" in p and b1 in p] == ["corrupt"]
    proxy.clear()
    proxy.add(R.Fault("corrupt", match=b2, at=4, times=100))
    r = _pull(store, *INSECURE, "--json", f"{proxy.host}/fx/twin:1")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["layers_fetched"] == 1 and not [p for m, p, s, k in proxy.log if b2 in p]
    with _db(store) as db:
        assert db.store.scalar("SELECT count(*) FROM diff WHERE diff_id = ?", (diff_id,)) == 1


def test_a_blob_whose_diff_is_stored_is_still_read_and_hashed(store):
    """Importer.ingest_tar with blob_digest (what pull passes): a diff the store has
    is not imported again, but the blob is still read to its end and its digest
    checked, so no blob handed to it is ever accepted unverified."""
    import hashlib
    import io

    from layerdb.engine.errors import DigestMismatch
    from layerdb.engine.ingest.importer import Importer

    diff_id, blobs = _twin_blobs()
    b1, b2 = ("sha256:" + hashlib.sha256(b).hexdigest() for b in blobs)
    with _db(store) as db:
        imp = Importer(db.store, db.content)

        def ingest(f, what, **kw):  # one write transaction, as pull's
            db.content.reset()
            try:
                with db.store.write():
                    db.store.execute("PRAGMA defer_foreign_keys = ON")
                    d = imp.ingest_tar(f, diff_id, what, **kw)
                    db.content.flush()
                    return d
            except BaseException:
                db.content.reset()
                raise

        assert ingest(io.BytesIO(blobs[0]), "layer 1", blob_digest=b1).new
        before = store_dump(store)
        damaged = bytearray(blobs[1])
        damaged[4] ^= 0xFF  # the gzip MTIME: the tar, and so the diff_id, as it was
        for data, digest in ((bytes(damaged), b2), (blobs[1], b1)):
            with pytest.raises(DigestMismatch, match=f"layer 2: blob: digest mismatch: expected {digest}"):
                ingest(io.BytesIO(data), "layer 2", blob_digest=digest)
        assert store_dump(store) == before
        f = io.BytesIO(blobs[1])
        assert not ingest(f, "layer 2", blob_digest=b2).new and f.tell() == len(blobs[1])
        # Without blob_digest (a local tar: commit, build) a stored diff is reused unread, as before.
        f = io.BytesIO(b"not read")
        assert not ingest(f, "layer").new and f.tell() == 0
        assert store_dump(store) == before


def test_schema1_and_oversized_manifests_are_refused(regs, store):
    ref = R.seed(regs["plain"], f"docker-archive:{SAMPLE_DOCKER}", "fx/v2s2:1")
    proxy = regs["proxy"]
    proxy.clear()
    # distribution converts a v2s2 manifest to schema1 when the client accepts only that.
    proxy.add(R.Fault("schema1", match="/manifests/"))
    r = _pull(store, *INSECURE, f"{proxy.host}/fx/v2s2:1")
    assert r.exit_code == 7 and "Docker schema 1" in r.stderr and len(r.stderr.splitlines()) == 1
    proxy.add(R.Fault("big", match="/manifests/"))
    r = _pull(store, *INSECURE, f"{proxy.host}/fx/v2s2:1")
    assert r.exit_code == 7 and "4 MiB limit" in r.stderr
    assert _pull(store, *INSECURE, ref).exit_code == 0  # the v2s2 manifest itself is fine


def test_unreachable_registries(store):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = _pull(store, *INSECURE, f"127.0.0.1:{port}/x:1")
    assert r.exit_code == 7 and "connection refused" in r.stderr and len(r.stderr.splitlines()) == 1
    r = _pull(store, "no-such-host.invalid/x:1")
    assert r.exit_code == 7 and "unknown host" in r.stderr
    assert not store.exists() or store_dump(store) is not None


def test_unknown_repository_and_tag(regs, store):
    host = regs["plain"].host
    r = _pull(store, *INSECURE, f"{host}/no/such:1")
    assert r.exit_code == 5 and "not found" in r.stderr
    R.seed(regs["plain"], f"oci-archive:{SAMPLE}", "fx/sample:1.0")
    r = _pull(store, *INSECURE, f"{host}/fx/sample:nope")
    assert r.exit_code == 5 and "fx/sample:nope" in r.stderr


def _store_with_another_image(regs, tmp_path):
    """A store holding an image that shares no layer with sample, and its dump."""
    store = tmp_path / "store.sqlite"
    other = R.seed(regs["plain"], f"oci-archive:{OPAQUE}", "fx/opaque:1")
    assert _pull(store, *INSECURE, other).exit_code == 0
    return store, other, store_dump(store)


def test_sigkill_mid_pull_leaves_the_store_as_it_was(regs, tmp_path):
    proxy, ref = _via_proxy(regs)
    store, other, before = _store_with_another_image(regs, tmp_path)
    big = ORACLE["sample"]["layers"][0]["digest"]
    proxy.add(R.Fault("slow", match=big, delay=0.3, times=5))
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    p = subprocess.Popen([sys.executable, "-m", "layerdb.cli", "--db", str(store), "pull", *INSECURE, ref],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    line = p.stderr.readline().decode()
    assert "fetching blob" in line, line
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert store_dump(store) == before
    assert list(tmpdir.iterdir()) == []  # spools are anonymous files
    with _db(store) as db:
        assert [i["repo_tags"] for i in db.images()] == [[other]]


def test_sigkill_after_some_layers_are_imported_leaves_the_store_as_it_was(regs, tmp_path):
    """One pull is one transaction: five layers imported, the top one stalled, then SIGKILL."""
    proxy, ref = _via_proxy(regs)
    store, _, before = _store_with_another_image(regs, tmp_path)
    last = ORACLE["sample"]["layers"][-1]["digest"]
    proxy.add(R.Fault("drop", match=last, at=10, stall=60))  # the top layer hangs after 10 bytes
    p = subprocess.Popen([sys.executable, "-m", "layerdb.cli", "--db", str(store), "pull", *INSECURE, ref],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = 0
    while done < 5:
        line = p.stderr.readline().decode()
        assert line, "the pull ended before five layers were imported"
        done += line.startswith("done ")
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stderr.close()
    assert store_dump(store) == before
    proxy.clear()
    r = run_cli("pull", *INSECURE, ref, db_path=store)
    assert r.exit_code == 0, r.output
    with _db(store) as db:
        _views_match(db, ref, REPO_FIXTURES / "oracle" / "sample", tmp_path)


# Push -------------------------------------------------------------------------------------


def test_repush_to_the_same_registry_keeps_the_digest_by_mounting(regs, store):
    plain = regs["plain"]
    ref = R.seed(plain, f"oci-archive:{SAMPLE}", "fx/sample:1.0")
    assert _pull(store, *INSECURE, ref).exit_code == 0
    mark = plain.mark()
    r = run_cli("push", "-q", *INSECURE, ref, f"{plain.host}/promoted/sample:1", "--preserve-digests", "--json",
                db_path=store)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["digest"] == ORACLE["sample"]["manifest_digest"] and out["kept"] and out["previous"] is None
    assert out["mounted"] == 7 and out["uploaded"] == 0  # six layers and the config, none uploaded
    reqs = plain.since(mark)
    mounts = [p for m, p, s in reqs if m == "POST" and "mount=" in p and s == 201]
    assert len(mounts) == 7 and all("from=fx%2Fsample" in p for p in mounts)
    assert not [p for m, p, s in reqs if m == "PATCH" or (m == "PUT" and "/blobs/" in p)]
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{plain.host}/promoted/sample:1"],
                         capture_output=True, check=True).stdout
    import hashlib

    assert "sha256:" + hashlib.sha256(raw).hexdigest() == ORACLE["sample"]["manifest_digest"]
    # Pushing it again: every blob exists, nothing is uploaded or mounted.
    r = run_cli("push", "-q", *INSECURE, ref, f"{plain.host}/promoted/sample:1", "--json", db_path=store)
    out = json.loads(r.stdout)
    assert (out["existed"], out["uploaded"], out["mounted"], out["kept"]) == (7, 0, 0, True)


def test_push_without_original_blobs_compresses_like_save_oci(regs, store, tmp_path):
    plain = regs["plain"]
    assert run_cli("import", str(SAMPLE_DOCKER), db_path=store).exit_code == 0
    dest = f"{plain.host}/built/sample:1"
    r = run_cli("push", "-q", *INSECURE, "localhost/sample:1.0", dest, "--json", db_path=store)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["previous"] is None and out["uploaded"] == 7
    # The layers are the blobs `save --format oci` writes: same bytes, same digests.
    oci = tmp_path / "saved.tar"
    assert run_cli("save", "localhost/sample:1.0", "--format", "oci", "-o", str(oci), db_path=store).exit_code == 0
    import tarfile

    with tarfile.open(oci) as t:
        idx = json.load(t.extractfile("index.json"))
        saved = json.load(t.extractfile("blobs/sha256/" + idx["manifests"][0]["digest"][7:]))
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{dest}"],
                         capture_output=True, check=True).stdout
    pushed = json.loads(raw)
    assert [x["digest"] for x in pushed["layers"]] == [x["digest"] for x in saved["layers"]]
    assert pushed["config"]["digest"] == ORACLE["sample"]["config_digest"]
    import hashlib

    assert out["digest"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    # skopeo copies it back; a fresh store imports it; the views are the oracle's.
    back = tmp_path / "back.tar"
    R.skopeo_copy(f"docker://{dest}", f"oci-archive:{back}:back:1", "--src-tls-verify=false")
    s2 = tmp_path / "s2.sqlite"
    assert run_cli("import", str(back), db_path=s2).exit_code == 0
    with _db(s2) as db:
        _views_match(db, "back:1", REPO_FIXTURES / "oracle" / "sample", tmp_path)


def test_push_that_changes_the_digest_reports_it_or_fails_with_preserve(regs, store):
    plain, tls = regs["plain"], regs["tls"]
    ref = R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    assert _pull(store, *INSECURE, ref).exit_code == 0
    before = tls.mark()
    creds = ("--cert-dir", str(tls.ca), "--creds", f"{R.USER}:{R.PASSWORD}")
    r = run_cli("push", "-q", *creds, ref, f"{tls.host}/copied/sample2:1", "--preserve-digests", db_path=store)
    assert r.exit_code == 7 and "--preserve-digests" in r.stderr and ORACLE["sample2"]["manifest_digest"] in r.stderr
    assert not [1 for m, p, s in tls.since(before) if m == "PUT" and "/manifests/" in p]
    r = run_cli("push", *creds, ref, f"{tls.host}/copied/sample2:1", "--format", "v2s2", db_path=store)
    assert r.exit_code == 0, r.output
    assert f"{ORACLE['sample2']['manifest_digest']} -> sha256:" in r.stderr
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--cert-dir", str(tls.ca), "--creds", f"{R.USER}:{R.PASSWORD}",
                          f"docker://{tls.host}/copied/sample2:1"], capture_output=True, check=True).stdout
    doc = json.loads(raw)
    assert doc["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert doc["config"]["digest"] == ORACLE["sample2"]["config_digest"]
    # Re-pushing the new manifest to its registry keeps it: the store remembered it.
    r = run_cli("push", "-q", *creds, ref, f"{tls.host}/copied/sample2:2", "--preserve-digests", "--format", "v2s2",
                "--json", db_path=store)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kept"] is True


def test_push_falls_back_to_chunked_patch(regs, store):
    proxy, ref = _via_proxy(regs, "fx/sample2:1", SAMPLE2)
    assert run_cli("import", str(SAMPLE2), "--tag", "local/s2:1", db_path=store).exit_code == 0
    proxy.add(R.Fault("reject-put", match="/blobs/uploads/", method="PUT", times=100))
    dest = f"{proxy.host}/chunked/s2:1"
    r = run_cli("push", "-q", *INSECURE, "local/s2:1", dest, "--json", db_path=store)
    assert r.exit_code == 0, r.output
    assert [k for m, p, s, k in proxy.log if m == "PATCH"]
    assert all(s == 202 for m, p, s, k in proxy.log if m == "PATCH")
    back = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{dest}"], capture_output=True)
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["Digest"] == json.loads(r.stdout)["digest"]


def test_push_without_dest_uses_the_tag(regs, store):
    plain = regs["plain"]
    ref = R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    assert _pull(store, *INSECURE, ref).exit_code == 0
    r = run_cli("push", "-q", *INSECURE, ref, "--json", db_path=store)
    assert r.exit_code == 0 and json.loads(r.stdout)["destination"] == ref
    assert run_cli("import", str(SAMPLE), db_path=store).exit_code == 0
    r = run_cli("push", "-q", "sample:1.0", db_path=store)
    assert r.exit_code == 2 and "give a destination" in r.stderr


def test_progress_lines_and_no_secret_in_verbose_logs(regs, store):
    tls = regs["tls"]
    ref = R.seed(tls, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    r = run_cli("-vv", "pull", "--cert-dir", str(tls.ca), "--creds", f"{R.USER}:{R.PASSWORD}", ref, db_path=store)
    assert r.exit_code == 0, r.output
    assert R.PASSWORD not in r.stderr and "YWxpY2U6czNjcmV0" not in r.stderr  # nor base64 of alice:s3cret
    lines = r.stderr.splitlines()
    for x in ORACLE["sample2"]["layers"]:
        assert sum(1 for line in lines if line.startswith("fetching blob " + x["digest"])) == 1
        assert sum(1 for line in lines if line == "done " + x["digest"]) == 1
    assert lines[-1] == "3 layers fetched (1.08MB), 0 stored already" or lines[-1].startswith("3 layers fetched")
    assert r.stdout.strip() == ORACLE["sample2"]["config_digest"]


def test_authorization_never_follows_a_redirect_to_another_host(regs, store):
    """Blob storage answers with a redirect: the token goes to the registry, never to the storage host."""
    tok, plain = regs["token"], regs["plain"]
    R.seed(tok, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")  # the "storage" serves the same blobs
    front = R.FaultProxy(tok.host)  # the registry, as the client sees it
    storage = R.FaultProxy(plain.host)
    try:
        front.add(R.Fault("offsite", match="/blobs/", to=storage.host, times=100))
        r = _pull(store, *INSECURE, f"{front.host}/fx/sample2:1")
        assert r.exit_code == 0, r.output
        assert any(a for p, a in front.authorized if "/blobs/" in p)  # the registry got the token
        blob_reqs = [a for p, a in storage.authorized if "/blobs/" in p]
        assert len(blob_reqs) == 4 and not any(blob_reqs)  # the config and three layers
    finally:
        front.stop()
        storage.stop()


def _put_index(host, repo, tag, doc):
    import http.client

    body = json.dumps(doc).encode()
    c = http.client.HTTPConnection(host)
    c.request("PUT", f"/v2/{repo}/manifests/{tag}", body=body,
              headers={"Content-Type": "application/vnd.oci.image.index.v1+json"})
    r = c.getresponse()
    r.read()
    assert r.status == 201, r.status
    import hashlib

    return {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
            "size": len(body)}


def test_nested_indexes(regs, store):
    plain = regs["plain"]
    R.seed(plain, f"oci-archive:{MULTI}:multi:1.0", "fx/multi:1.0", "--all")
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{plain.host}/fx/multi:1.0"],
                         capture_output=True, check=True).stdout
    import hashlib

    inner = {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + hashlib.sha256(raw).hexdigest(),
             "size": len(raw)}
    two = _put_index(plain.host, "fx/multi", "nested2", {"schemaVersion": 2, "mediaType": inner["mediaType"],
                                                           "manifests": [inner]})
    _put_index(plain.host, "fx/multi", "nested3", {"schemaVersion": 2, "mediaType": inner["mediaType"],
                                                    "manifests": [two]})
    r = run_cli("pull", "-q", *INSECURE, "--platform", "linux/arm64", f"{plain.host}/fx/multi:nested2", "--json",
                db_path=store)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["id"] == ORACLE["opaque"]["config_digest"]
    before = store_dump(store)
    r = _pull(store, *INSECURE, f"{plain.host}/fx/multi:nested3")
    assert r.exit_code == 7 and "nested more than 2 deep" in r.stderr
    assert store_dump(store) == before


def test_per_host_certs_d_directory(regs, store, tmp_path, monkeypatch):
    tls = regs["tls"]
    ref = R.seed(tls, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    d = tmp_path / "config" / "containers" / "certs.d" / tls.host
    d.mkdir(parents=True)
    shutil.copy(tls.ca / "ca.crt", d / "ca.crt")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    r = _pull(store, ref, "--creds", f"{R.USER}:{R.PASSWORD}")
    assert r.exit_code == 0, r.output
    # A client key without its certificate is a clear error.
    (d / "client.key").write_text("x")
    r = _pull(store, ref, "--creds", f"{R.USER}:{R.PASSWORD}")
    assert r.exit_code == 2 and "client.key has no matching .cert" in r.stderr


def test_build_pulls_a_from_image_it_lacks(regs, store, tmp_path):
    """FROM an image the store lacks pulls it first (buildah's pull policy
    'missing'); --no-pull refuses with one line and leaves the store alone."""
    ref = R.seed(regs["plain"], f"oci-archive:{SAMPLE}", "fx/buildbase:1")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {ref}\nCOPY hello.txt /hello.txt\n")
    (ctx / "hello.txt").write_bytes(b"built on a pulled base\n")
    r = run_cli("build", "--no-pull", "-t", "b:1", str(ctx), db_path=store)
    assert r.exit_code != 0 and "no such image in the store" in r.output
    with _db(store) as db:
        assert db.images() == []
    r = run_cli("build", *INSECURE, "-t", "b:1", str(ctx), db_path=store)
    assert r.exit_code == 0, r.output
    with _db(store) as db:
        ids = {tuple(i["repo_tags"]): i["id"] for i in db.images()}
        assert ids[(ref,)] == ORACLE["sample"]["config_digest"]  # the base, pulled under its own digest
        base = [h["diff_id"] for h in db.history(ref) if h["diff_id"]]
        built = [h["diff_id"] for h in db.history("b:1") if h["diff_id"]]
        assert built[1:] == base and len(built) == len(base) + 1  # history is newest first
        assert b"".join(db.cat("b:1", "/hello.txt")) == b"built on a pulled base\n"
