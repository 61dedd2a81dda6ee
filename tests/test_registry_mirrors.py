"""registries.conf mirrors, rewritten locations, insecure and blocked registries, with two real
registries: the shared plain one as the location, and a second one started here as the mirror.
Which one served what is read from each registry's own access log."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from conftest import run_cli, store_dump

import registry_env as R
from registry_env import INSECURE, OPAQUE, ORACLE, SAMPLE2

pytestmark = R.NEEDS
regs = R.regs  # the shared registries, a session fixture


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    reg = R.start_registry(tmp_path_factory.mktemp("mirror") / "reg")
    R.seed(reg, f"oci-archive:{SAMPLE2}", "cache/fx/sample2:1")
    yield reg
    reg.stop()


@pytest.fixture
def conf(tmp_path, monkeypatch):
    path = tmp_path / "registries.conf"
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(path))

    def write(text: str, name: str | None = None):
        target = path if name is None else path.with_name(path.name + ".d") / name
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
    return write


def _blob_gets(reg, mark):
    return sorted(p.rsplit("/", 1)[1] for m, p, s in reg.since(mark) if m == "GET" and "/blobs/" in p and s == 200)


def _wanted(name):
    o = ORACLE[name]
    return sorted([o["config_digest"], *(x["digest"] for x in o["layers"])])


def _pull(store, *args):
    r = run_cli("pull", "-q", *args, "--json", db_path=store)
    assert r.exit_code == 0, r.output
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_a_drop_in_mirror_serves_the_pull_and_the_tag_is_the_name_asked_for(regs, mirror, conf, tmp_path):
    plain = regs["plain"]
    # The main file names the registry; a drop-in replaces its entry with one that has a mirror.
    conf(f'[[registry]]\nlocation = "{plain.host}"\n')
    conf(f'[[registry]]\nlocation = "{plain.host}"\n\n[[registry.mirror]]\nlocation = "{mirror.host}/cache"\n'
         'insecure = true\n', "50-mirror.conf")
    store = tmp_path / "s.sqlite"
    m, p = mirror.mark(), plain.mark()
    # Without --tls-verify=false: only the mirror is insecure, and it serves everything.
    (out,) = _pull(store, f"{plain.host}/fx/sample2:1")
    assert out["id"] == ORACLE["sample2"]["config_digest"] and out["source"] == f"{mirror.host}/cache/fx/sample2:1"
    assert _blob_gets(mirror, m) == _wanted("sample2")
    assert plain.since(p) == []
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        assert db.images()[0]["repo_tags"] == [f"{plain.host}/fx/sample2:1"]
        # Where the blobs were seen is where they came from: the mirror.
        assert {tuple(r) for r in db.store.execute("SELECT DISTINCT registry, repository FROM seen")} == {
            (mirror.host, "cache/fx/sample2")}
    assert run_cli("fsck", db_path=store).exit_code == 0


def test_a_mirror_without_the_image_falls_back_to_the_location(regs, mirror, conf, tmp_path):
    plain = regs["plain"]
    R.seed(plain, f"oci-archive:{OPAQUE}", "fx/opaque:1")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # a mirror that refuses connections, then one that lacks the image
    conf(f'[[registry]]\nlocation = "{plain.host}"\ninsecure = true\n\n'
         f'[[registry.mirror]]\nlocation = "127.0.0.1:{port}"\ninsecure = true\n\n'
         f'[[registry.mirror]]\nlocation = "{mirror.host}/cache"\ninsecure = true\n')
    m, p = mirror.mark(), plain.mark()
    (out,) = _pull(tmp_path / "s.sqlite", f"{plain.host}/fx/opaque:1")
    assert out["id"] == ORACLE["opaque"]["config_digest"] and out["source"] == f"{plain.host}/fx/opaque:1"
    assert [(meth, s) for meth, path, s in mirror.since(m) if "/manifests/" in path] == [("GET", 404)]
    assert _blob_gets(mirror, m) == []
    assert _blob_gets(plain, p) == _wanted("opaque")


def test_a_digest_only_mirror_is_skipped_for_tags(regs, mirror, conf, tmp_path):
    plain = regs["plain"]
    R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    conf(f'[[registry]]\nlocation = "{plain.host}"\ninsecure = true\n\n'
         f'[[registry.mirror]]\nlocation = "{mirror.host}/cache"\ninsecure = true\npull-from-mirror = "digest-only"\n')
    m = mirror.mark()
    (out,) = _pull(tmp_path / "a.sqlite", f"{plain.host}/fx/sample2:1")
    assert out["source"] == f"{plain.host}/fx/sample2:1" and mirror.since(m) == []
    d = ORACLE["sample2"]["manifest_digest"]
    (out,) = _pull(tmp_path / "b.sqlite", f"{plain.host}/fx/sample2@{d}")
    assert out["source"] == f"{mirror.host}/cache/fx/sample2@{d}"
    assert _blob_gets(mirror, m) == _wanted("sample2")


def test_a_prefix_rewritten_to_another_location_for_pull_and_push(mirror, conf, tmp_path):
    conf(f'[[registry]]\nprefix = "registry.example.invalid/team"\nlocation = "{mirror.host}/cache/fx"\n'
         'insecure = true\n')
    store = tmp_path / "s.sqlite"
    (out,) = _pull(store, "registry.example.invalid/team/sample2:1")
    assert out["id"] == ORACLE["sample2"]["config_digest"]
    assert out["repo_tags"] == ["registry.example.invalid/team/sample2:1"]
    r = run_cli("push", "-q", "registry.example.invalid/team/sample2:1", "registry.example.invalid/team/copy:1",
                "--json", db_path=store)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["destination"] == f"{mirror.host}/cache/fx/copy:1"
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{mirror.host}/cache/fx/copy:1"],
                         capture_output=True, check=True).stdout
    import hashlib

    assert "sha256:" + hashlib.sha256(raw).hexdigest() == ORACLE["sample2"]["manifest_digest"]


def test_blocked_registries_and_a_broken_file_are_one_line(regs, conf, tmp_path):
    plain = regs["plain"]
    R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    store = tmp_path / "s.sqlite"
    _pull(store, *INSECURE, f"{plain.host}/fx/sample2:1")  # no file yet: the registry as named
    before = store_dump(store)
    conf(f'[[registry]]\nprefix = "{plain.host}/fx"\nblocked = true\n')
    for args in (("pull", *INSECURE, f"{plain.host}/fx/sample2:1"),
                 ("push", *INSECURE, f"{plain.host}/fx/sample2:1", f"{plain.host}/fx/other:1")):
        r = run_cli(*args, db_path=store)
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert f"{plain.host}/fx/sample2" in r.stderr or f"{plain.host}/fx/other" in r.stderr
        assert "blocked by registries.conf" in r.stderr
    assert store_dump(store) == before
    # A repository that only starts with the same letters is not under the prefix.
    R.seed(plain, f"oci-archive:{SAMPLE2}", "fx2/sample2:1")
    _pull(tmp_path / "other.sqlite", *INSECURE, f"{plain.host}/fx2/sample2:1")
    conf('[[registry]\nlocation = "x"\n')
    r = run_cli("pull", *INSECURE, f"{plain.host}/fx/sample2:1", db_path=store)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and "registries.conf: cannot read it" in r.stderr
    assert store_dump(store) == before


def test_which_entry_a_reference_matches(conf):
    from layerdb.engine.registry import mirrors, reference

    conf('[[registry]]\nprefix = "*.example.com"\ninsecure = true\n\n'
         '[[registry]]\nlocation = "registry.example.com/team"\n\n'
         '[[registry]]\nprefix = "registry.example.com/team/app"\nlocation = "other.example.net/app"\n'
         'mirror-by-digest-only = true\n\n[[registry.mirror]]\nlocation = "mirror.example.org/app"\n\n'
         '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n'
         '[[registry.mirror]]\nlocation = "hub-cache.example.org:5000"\npull-from-mirror = "all"\n')

    def where(name, pull=True):
        return [(str(s.ref), s.insecure, s.mirror) for s in mirrors.sources(reference.parse(name), pull=pull)]

    # The longest prefix wins; the location replaces the prefix, keeping the rest and the tag.
    assert where("registry.example.com/team/app/web:1") == [("other.example.net/app/web:1", False, False)]
    d = "sha256:" + "a" * 64
    assert where(f"registry.example.com/team/app/web@{d}") == [
        (f"mirror.example.org/app/web@{d}", False, True), (f"other.example.net/app/web@{d}", False, False)]
    # A prefix matches whole path components only; the wildcard matches subdomains, not the domain.
    assert where("registry.example.com/team2/x:1") == [("registry.example.com/team2/x:1", True, False)]
    assert where("example.com/x:1") == [("example.com/x:1", False, False)]
    # Docker Hub's short names are docker.io's; push never goes to a mirror.
    assert where("alpine") == [("hub-cache.example.org:5000/library/alpine:latest", False, True),
                               ("docker.io/library/alpine:latest", False, False)]
    assert where("alpine", pull=False) == [("docker.io/library/alpine:latest", False, False)]


def test_tls_verify_is_a_tri_state_over_registries_conf(regs, conf, tmp_path):
    """As podman and skopeo: no --tls-verify follows registries.conf's `insecure`;
    --tls-verify=true verifies even a registry marked insecure there (plain HTTP and a
    self-signed certificate are then refused); --tls-verify=false verifies none."""
    plain, tls = regs["plain"], regs["tls"]
    ref = R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    conf(f'[[registry]]\nlocation = "{plain.host}"\ninsecure = true\n\n'
         f'[[registry]]\nlocation = "{tls.host}"\ninsecure = true\n')
    store = tmp_path / "s.sqlite"
    run_cli("images", db_path=store)
    before = store_dump(store)
    p = plain.mark()
    # The bare flag is true and leaves the reference after it alone, as podman's Go boolean does.
    for args in (("pull", "--tls-verify=true", ref), ("pull", "--tls-verify", "yes", ref),
                 ("pull", "--tls-verify", ref), ("pull", ref, "--tls-verify"), ("pull", "--tls-verify", "-q", ref)):
        r = run_cli(*args, db_path=store)
        assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1 and "--tls-verify=false" in r.stderr, r.output
    assert plain.since(p) == [] and store_dump(store) == before
    (out,) = _pull(store, ref)  # unset: the file's insecure = true allows plain HTTP
    assert out["id"] == ORACLE["sample2"]["config_digest"]
    p = plain.mark()
    r = run_cli("push", "--tls-verify=1", ref, f"{plain.host}/fx/tri:1", db_path=store)
    assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1 and "--tls-verify=false" in r.stderr, r.output
    assert plain.since(p) == []
    r = run_cli("push", "-q", ref, f"{plain.host}/fx/tri:1", db_path=store)
    assert r.exit_code == 0, r.output
    # login: the TLS registry's self-signed certificate, without --cert-dir.
    auth = tmp_path / "auth.json"

    def login(*args):
        return run_cli("login", "--authfile", str(auth), "-u", R.USER, "--password-stdin", *args, tls.host,
                       input=f"{R.PASSWORD}\n".encode())

    for flag in (("--tls-verify=true",), ("--tls-verify", "T")):
        r = login(*flag)
        assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1 and not auth.exists(), r.output
    r = login("--tls-verify")  # the registry follows: the bare flag is true, not its value
    assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1 and not auth.exists(), r.output
    assert login().exit_code == 0 and list(json.loads(auth.read_text())["auths"]) == [tls.host]
    # Without the file's entries: unset verifies, false does not.
    conf("")
    r = run_cli("pull", "-q", f"{plain.host}/fx/tri:1", db_path=tmp_path / "t.sqlite")
    assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1, r.output
    (out,) = _pull(tmp_path / "t.sqlite", "--tls-verify=false", f"{plain.host}/fx/tri:1")
    assert out["id"] == ORACLE["sample2"]["config_digest"]
    assert login("--tls-verify=FALSE").exit_code == 0
    # A value that is not a boolean is a usage error, for every command that takes it.
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text(f"FROM {plain.host}/fx/tri:1\n")
    for args in (("pull", "--tls-verify=maybe", ref), ("push", "--tls-verify=", ref),
                 ("login", "--tls-verify=2", "-u", "x", "-p", "y", tls.host),
                 ("build", "--tls-verify=on", str(tmp_path / "ctx"))):
        r = run_cli(*args, db_path=store)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
        assert "Invalid value for '--tls-verify'" in r.stderr and "expected true or false" in r.stderr
