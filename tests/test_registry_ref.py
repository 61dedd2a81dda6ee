"""Registry pieces that need no registry: references, platforms, challenges, credentials."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from layerdb.engine.errors import RegistryAuthError, UsageError
from layerdb.engine.registry import creds, manifest as mf, reference
from layerdb.engine.registry.client import parse_challenge


@pytest.mark.parametrize("ref,want", [
    ("alpine", ("docker.io", "library/alpine", "latest", None)),
    ("alpine:3.19", ("docker.io", "library/alpine", "3.19", None)),
    ("user/app", ("docker.io", "user/app", "latest", None)),
    ("docker.io/alpine", ("docker.io", "library/alpine", "latest", None)),
    ("index.docker.io/library/alpine:1", ("docker.io", "library/alpine", "1", None)),
    ("registry-1.docker.io/x/y", ("docker.io", "x/y", "latest", None)),
    ("localhost/app", ("localhost", "app", "latest", None)),
    ("localhost:5000/a/b/c:t", ("localhost:5000", "a/b/c", "t", None)),
    ("127.0.0.1:5000/team/app:1", ("127.0.0.1:5000", "team/app", "1", None)),
    ("quay.io/podman/hello", ("quay.io", "podman/hello", "latest", None)),
    ("[::1]:5000/app", ("[::1]:5000", "app", "latest", None)),
    ("ghcr.io/a/b@sha256:" + "a" * 64, ("ghcr.io", "a/b", None, "sha256:" + "a" * 64)),
    ("ghcr.io/a/b:v1@sha256:" + "b" * 64, ("ghcr.io", "a/b", "v1", "sha256:" + "b" * 64)),
    ("my_app-x.y__z", ("docker.io", "library/my_app-x.y__z", "latest", None)),
])
def test_reference_parsing(ref, want):
    r = reference.parse(ref)
    assert (r.registry, r.repository, r.tag, r.digest) == want


def test_reference_names():
    r = reference.parse("alpine")
    assert r.api_host == "registry-1.docker.io"
    assert r.with_tag() == "docker.io/library/alpine:latest"
    assert str(r) == "docker.io/library/alpine:latest"
    d = "sha256:" + "c" * 64
    r = reference.parse(f"127.0.0.1:5000/x@{d}")
    assert r.reference == d and r.with_tag() == f"127.0.0.1:5000/x@{d}" and r.api_host == "127.0.0.1:5000"
    r = reference.parse(f"127.0.0.1:5000/x:t@{d}")
    assert r.reference == d and r.with_tag() == "127.0.0.1:5000/x:t"


@pytest.mark.parametrize("bad", ["", "Alpine", "a b", "host:5000/", "x/Y:1", "a:", "a@sha256:abc", "https://x/y",
                                 "a//b", "-a", "a:" + "t" * 129, "a:.tag"])
def test_reference_refused(bad):
    with pytest.raises(UsageError):
        reference.parse(bad)


def test_parse_registry():
    assert reference.parse_registry("https://127.0.0.1:5000/v2/") == "127.0.0.1:5000"
    assert reference.parse_registry("index.docker.io") == "docker.io"
    with pytest.raises(UsageError):
        reference.parse_registry("a b")


@pytest.mark.parametrize("p,want", [
    ("linux/arm64", ("linux", "arm64", "v8")),
    ("linux/arm64/v8", ("linux", "arm64", "v8")),
    ("linux/aarch64", ("linux", "arm64", "v8")),
    ("linux/arm", ("linux", "arm", "v7")),
    ("linux/arm/v6", ("linux", "arm", "v6")),
    ("linux/amd64", ("linux", "amd64", None)),
    ("linux/x86_64", ("linux", "amd64", None)),
])
def test_platform_normalisation(p, want):
    assert mf.parse_platform(p) == want


def _index(*plats):
    return {"manifests": [{"mediaType": mf.OCI_MANIFEST, "digest": f"sha256:{i:064x}", "size": 1,
                           "platform": dict(zip(("os", "architecture", "variant"), p))}
                          for i, p in enumerate(plats)]}


def test_platform_selection():
    idx = _index(("unknown", "unknown"), ("linux", "amd64"), ("linux", "arm64", "v8"), ("linux", "arm", "v7"),
                 ("linux", "arm", "v6"))
    assert mf.select(idx, mf.parse_platform("linux/arm64"), "i")["digest"].endswith("2")
    assert mf.select(idx, mf.parse_platform("linux/arm"), "i")["digest"].endswith("3")
    assert mf.select(idx, mf.parse_platform("linux/arm/v6"), "i")["digest"].endswith("4")
    assert mf.select(idx, mf.parse_platform("linux/amd64"), "i")["digest"].endswith("1")
    # arm64 without a variant in the index still matches arm64/v8
    assert mf.select(_index(("linux", "arm64")), mf.parse_platform("linux/arm64/v8"), "i")["digest"].endswith("0")
    assert len(mf.entries(idx, "i")) == 4  # the attestation entry is skipped
    with pytest.raises(Exception, match=r"no image for platform linux/s390x \(has linux/amd64, linux/arm/v6"):
        mf.select(idx, mf.parse_platform("linux/s390x"), "i")


def test_challenge_parsing():
    s, p = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                           'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"')
    assert s == "bearer"
    assert p == {"realm": "https://auth.example/token", "service": "reg",
                 "scope": "repository:a/b:pull,push repository:c:pull", "error": "insufficient_scope"}
    assert parse_challenge('Basic realm="layerdb-test"') == ("basic", {"realm": "layerdb-test"})


# Credentials --------------------------------------------------------------------


def test_credentials_never_show_the_secret():
    c = creds.Credentials("alice", "hunter2-secret", "--creds")
    for s in (repr(c), str(c), f"{c}", repr([c]), repr({"c": c})):
        assert "hunter2" not in s
    assert "alice" in repr(c)
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(c)
    assert creds.parse_creds("bob:pa:ss").secret == "pa:ss"
    with pytest.raises(UsageError):
        creds.parse_creds(":x")


@pytest.fixture
def home(tmp_path, monkeypatch):
    for k in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _auth(u, p):
    return base64.b64encode(f"{u}:{p}".encode()).decode()


def test_lookup_order(home, monkeypatch):
    docker = home / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": _auth("hub", "h")},
                                            "reg.example:5000": {"auth": _auth("d", "1")}}}))
    assert creds.find("docker.io").username == "hub"
    assert creds.find("reg.example:5000").username == "d"
    containers = home / ".config" / "containers" / "auth.json"
    containers.parent.mkdir(parents=True)
    containers.write_text(json.dumps({"auths": {"reg.example:5000": {"auth": _auth("c", "2")},
                                                "reg.example:5000/team": {"auth": _auth("team", "3")}}}))
    assert creds.find("reg.example:5000").username == "c"
    assert creds.find("reg.example:5000", "team/app").username == "team"
    run = home / "run"
    (run / "containers").mkdir(parents=True)
    (run / "containers" / "auth.json").write_text(json.dumps({"auths": {"reg.example:5000": {"auth": _auth("r", "4")}}}))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    assert creds.find("reg.example:5000").username == "r"
    env = home / "env.json"
    env.write_text(json.dumps({"auths": {"reg.example:5000": {"username": "e", "password": "5"}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env))
    assert creds.find("reg.example:5000").username == "e"
    other = home / "other.json"
    other.write_text("{}")
    assert creds.find("reg.example:5000", authfile=str(other)) is None
    assert creds.find("reg.example:5000", creds=creds.Credentials("x", "y")).username == "x"
    assert creds.find("nowhere.example") is None


def _helper(bindir, name, body):
    p = bindir / f"docker-credential-{name}"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)


def test_credential_helpers(home, monkeypatch):
    bindir = home / "bin"
    bindir.mkdir()
    log = home / "helper.log"
    _helper(bindir, "ldbtest", f'read s; echo "$1 $s" >> {log}; '
            'if [ "$s" = "127.0.0.1:5443" ]; then echo \'{"ServerURL":"x","Username":"alice","Secret":"pw"}\'; '
            'else echo "credentials not found in native keychain"; exit 1; fi\n')
    _helper(bindir, "store", 'read s; echo \'{"Username":"<token>","Secret":"refresh-me"}\'\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    cfg = home / ".docker" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"credHelpers": {"127.0.0.1:5443": "ldbtest", "other:1": "ldbtest"},
                               "credsStore": "store"}))
    c = creds.find("127.0.0.1:5443")
    assert (c.username, c.secret, c.source) == ("alice", "pw", "docker-credential-ldbtest")
    assert log.read_text() == "get 127.0.0.1:5443\n"
    assert creds.find("other:1") is None
    c = creds.find("docker.io")
    assert c.identity_token == "refresh-me"
    cfg.write_text(json.dumps({"credsStore": "missing"}))
    with pytest.raises(RegistryAuthError, match="docker-credential-missing is not installed"):
        creds.find("x.example")


def test_store_and_remove(home):
    path = str(home / "a" / "auth.json")
    creds.store(path, "127.0.0.1:5000", creds.Credentials("alice", "s3cret"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(open(path).read())
    assert data == {"auths": {"127.0.0.1:5000": {"auth": _auth("alice", "s3cret")}}}
    creds.store(path, "other:1", creds.Credentials("bob", "x"))
    assert creds.lookup_file(path, "127.0.0.1:5000").secret == "s3cret"
    assert creds.remove(path, "127.0.0.1:5000") is True
    assert creds.remove(path, "127.0.0.1:5000") is False
    assert list(json.loads(open(path).read())["auths"]) == ["other:1"]
    assert [p.name for p in (home / "a").iterdir()] == ["auth.json"]  # no temporary file left


# The schema change: version 1 stores are migrated in place ------------------------------


def test_version_1_store_is_migrated_in_place(tmp_path):
    import apsw

    from conftest import REPO_FIXTURES, store_dump
    from layerdb.engine.api import LayerDB
    from layerdb.engine.store import SCHEMA_VERSION, schema_sql

    v1 = schema_sql().split("-- @version 2")[0]
    path = tmp_path / "old.sqlite"
    conn = apsw.Connection(str(path))
    conn.execute(v1)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    # A version-1 store with an image in it: the importer of version 1 wrote the same tables.
    staging = tmp_path / "staging.sqlite"
    with LayerDB(staging) as db:
        db.import_archive(str(REPO_FIXTURES / "images" / "sample2.oci.tar"))
    conn = apsw.Connection(str(path))
    conn.execute("ATTACH ? AS s", (str(staging),))
    with conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchall():
            cols = ", ".join(f'"{c[1]}"' for c in conn.execute(f'PRAGMA main.table_info("{name}")'))
            conn.execute(f'INSERT INTO main."{name}" SELECT {cols} FROM s."{name}"')
    conn.execute("DETACH s")
    conn.close()
    before = store_dump(path)
    with LayerDB(path) as db:
        assert db.store.scalar("PRAGMA user_version") == SCHEMA_VERSION == 4
        tables = {n for (n,) in db.store.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        assert {"manifest", "manifest_layer", "manifest_child", "seen", "build_cache"} <= tables
        assert [i["repo_tags"] for i in db.images()] == [["sample2:1.0"]]
    after = dict(store_dump(path))
    for name, rows in before:
        # Nothing that was there changed; version 4 adds diff.digests, NULL for old diffs.
        assert [r[:len(rows[0])] if name == "diff" else r for r in after[name]] == rows
        if name == "diff":
            assert {r[len(rows[0]):] for r in after[name]} == {(None,)}
    # An old store reads and checks as it did: fsck --deep without content tags.
    with LayerDB(path) as db:
        assert list(db.fsck(deep=True).findings()) == []
    # The migrated schema is the one a new store gets.
    fresh = tmp_path / "fresh.sqlite"
    LayerDB(fresh).close()

    def schema(p):
        c = apsw.Connection(str(p))
        try:
            return sorted(r for r in c.execute("SELECT type, name, tbl_name FROM sqlite_schema"))
        finally:
            c.close()

    assert schema(path) == schema(fresh)
