"""Short names from registries.conf ([aliases], unqualified-search-registries,
short-name-mode) and login/logout with registries.conf, against real registries:
the shared plain one, and an empty one started here that has no repository at all.
Which registry was asked is read from each registry's own access log."""

from __future__ import annotations

import base64
import json
import socket

import pytest

from conftest import run_cli, store_dump

import registry_env as R
from registry_env import ORACLE, SAMPLE2

pytestmark = R.NEEDS
regs = R.regs  # the shared registries, a session fixture


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    reg = R.start_registry(tmp_path_factory.mktemp("empty") / "reg")
    yield reg
    reg.stop()


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """Writes the registries.conf ($CONTAINERS_REGISTRIES_CONF) or one of its drop-ins;
    the host's short-name-aliases.conf cache is replaced by an empty place."""
    path = tmp_path / "registries.conf"
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(path))
    from layerdb.engine.registry import shortnames

    real_cache_path = shortnames.alias_cache_path
    monkeypatch.setattr(shortnames, "alias_cache_path", lambda: str(tmp_path / "no-cache.conf"))

    def write(text: str, name: str | None = None):
        target = path if name is None else path.with_name(path.name + ".d") / name
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
        return target
    write.real_cache_path = real_cache_path
    return write


def _insecure(*hosts: str) -> str:
    return "".join(f'[[registry]]\nlocation = "{h}"\ninsecure = true\n\n' for h in hosts)


def _dead_host() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


def _pull(store, *args):
    r = run_cli("pull", "-q", *args, "--json", db_path=store)
    assert r.exit_code == 0, r.output
    return [json.loads(x) for x in r.stdout.splitlines()]


def _manifest_gets(reg, mark):
    return [(m, p, s) for m, p, s in reg.since(mark) if "/manifests/" in p]


def test_an_alias_names_the_registry_and_the_image_gets_the_full_reference(regs, empty, conf, tmp_path):
    plain = regs["plain"]
    R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    # The search list would find nothing: the alias wins over it.
    conf(f'unqualified-search-registries = ["{empty.host}"]\n\n[aliases]\n"sample2" = "{empty.host}/nowhere"\n\n'
         + _insecure(plain.host, empty.host))
    conf(f'[aliases]\n"sample2" = "{plain.host}/fx/sample2"\n', "10-aliases.conf")  # a drop-in overrides
    store = tmp_path / "s.sqlite"
    e = empty.mark()
    (out,) = _pull(store, "sample2:1")
    assert out["id"] == ORACLE["sample2"]["config_digest"]
    assert out["repo_tags"] == [f"{plain.host}/fx/sample2:1"] and out["reference"] == f"{plain.host}/fx/sample2:1"
    assert empty.since(e) == []
    # By digest: the digest goes onto the alias's target.
    d = ORACLE["sample2"]["manifest_digest"]
    (out,) = _pull(tmp_path / "d.sqlite", f"sample2@{d}")
    assert out["reference"] == f"{plain.host}/fx/sample2@{d}"
    # A reference with a registry part is never rewritten by an alias of its repository's name.
    conf(f'[aliases]\n"fx/sample2" = "{empty.host}/nowhere"\n', "20-more.conf")
    (out,) = _pull(tmp_path / "q.sqlite", f"{plain.host}/fx/sample2:1")
    assert out["repo_tags"] == [f"{plain.host}/fx/sample2:1"] and empty.since(e) == []
    # An empty value in a later drop-in erases the alias: the search list answers, and has nothing.
    conf('[aliases]\n"sample2" = ""\n', "30-erase.conf")
    r = run_cli("pull", "-q", "sample2:1", db_path=tmp_path / "e.sqlite")
    assert r.exit_code == 5 and len(r.stderr.splitlines()) == 1, r.stderr
    assert ("GET", "/v2/sample2/manifests/1", 404) in _manifest_gets(empty, e)


def test_unqualified_search_registries_are_tried_in_order(regs, empty, conf, tmp_path):
    plain = regs["plain"]
    R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    conf(f'unqualified-search-registries = ["{empty.host}", "{plain.host}"]\n\n' + _insecure(plain.host, empty.host))
    store = tmp_path / "s.sqlite"
    e, p = empty.mark(), plain.mark()
    (out,) = _pull(store, "fx/sample2:1")
    assert out["id"] == ORACLE["sample2"]["config_digest"]
    assert out["repo_tags"] == [f"{plain.host}/fx/sample2:1"] and out["source"] == f"{plain.host}/fx/sample2:1"
    # The first was asked, answered 404, and served nothing; the second served the image.
    assert _manifest_gets(empty, e) == [("GET", "/v2/fx/sample2/manifests/1", 404)]
    assert [s for m, path, s in _manifest_gets(plain, p)] == [200]
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        assert db.images()[0]["repo_tags"] == [f"{plain.host}/fx/sample2:1"]
    # permissive (the default) and disabled try every candidate without a terminal; enforcing refuses.
    conf('short-name-mode = "disabled"\n', "10-mode.conf")
    assert _pull(tmp_path / "dis.sqlite", "fx/sample2:1")[0]["reference"] == f"{plain.host}/fx/sample2:1"
    mode = conf('short-name-mode = "enforcing"\n', "10-mode.conf")
    r = run_cli("pull", "-q", "fx/sample2:1", db_path=tmp_path / "enf.sqlite")
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "ambiguous" in r.stderr and str(mode) in r.stderr and empty.host in r.stderr and plain.host in r.stderr
    # With one search registry there is nothing to choose, even when enforcing.
    conf(f'unqualified-search-registries = ["{plain.host}"]\n', "20-one.conf")
    assert _pull(tmp_path / "one.sqlite", "fx/sample2:1")[0]["reference"] == f"{plain.host}/fx/sample2:1"


def test_the_error_names_every_registry_tried(empty, conf, tmp_path):
    dead = _dead_host()
    main = conf(f'unqualified-search-registries = ["{empty.host}", "{dead}"]\n\n' + _insecure(empty.host, dead))
    store = tmp_path / "s.sqlite"
    e = empty.mark()
    r = run_cli("pull", "-q", "fx/missing:2", db_path=store)
    assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.output, r.output
    line = r.stderr
    assert "fx/missing" in line and str(main) in line
    assert f"{empty.host}/fx/missing:2" in line and f"{dead}/fx/missing:2" in line
    assert _manifest_gets(empty, e) == [("GET", "/v2/fx/missing/manifests/2", 404)]
    # Not found everywhere: the not-found exit code.
    conf(f'unqualified-search-registries = ["{empty.host}"]\n', "10-one.conf")
    r = run_cli("pull", "-q", "fx/missing:2", db_path=store)
    assert r.exit_code == 5 and len(r.stderr.splitlines()) == 1, r.output
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        assert db.images() == []


def test_resolution_without_a_registry(conf, tmp_path, monkeypatch):
    from layerdb.engine.registry import shortnames

    def names(n):
        r = shortnames.resolve(n)
        return [str(c) for c in r.candidates], r.how

    # No file sets unqualified-search-registries: Docker Hub, as docker normalises it.
    conf('[aliases]\n"fedora" = "registry.fedoraproject.org/fedora"\n')
    assert names("alpine") == (["docker.io/library/alpine:latest"], "docker-hub")
    assert names("fedora:40") == (["registry.fedoraproject.org/fedora:40"], "alias")
    assert names("quay.io/fedora/fedora") == (["quay.io/fedora/fedora:latest"], "qualified")
    # docker.io among the search registries gets docker's library/ too; the key is the name as written.
    conf('unqualified-search-registries = ["quay.io", "docker.io"]\n[aliases]\n"library/fedora" = "docker.io/fedora"\n')
    assert names("fedora") == (["quay.io/fedora:latest", "docker.io/library/fedora:latest"], "search")
    assert names("library/fedora:1") == (["docker.io/library/fedora:1"], "alias")
    # An empty list set on purpose is not "unset": podman refuses, so does layerdb.
    conf('unqualified-search-registries = []\n', "10-none.conf")
    with pytest.raises(Exception, match="unqualified-search-registries in .*10-none.conf is empty"):
        shortnames.resolve("fedora")
    # The machine-written cache (a rootless user's is under $XDG_CACHE_HOME) wins over the files.
    monkeypatch.setattr(shortnames, "alias_cache_path", conf.real_cache_path)
    conf('[aliases]\n"fedora" = "registry.fedoraproject.org/fedora"\n')
    (tmp_path / "registries.conf.d" / "10-none.conf").unlink()
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert shortnames.alias_cache_path() == str(tmp_path / "cache" / "containers" / "short-name-aliases.conf")
    (tmp_path / "cache" / "containers").mkdir(parents=True)
    (tmp_path / "cache" / "containers" / "short-name-aliases.conf").write_text(
        '[aliases]\n"fedora" = "quay.io/fedora/fedora"\n')
    assert names("fedora") == (["quay.io/fedora/fedora:latest"], "alias")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert shortnames.alias_cache_path() == "/var/cache/containers/short-name-aliases.conf"


@pytest.mark.parametrize("text,where,says", [
    ('[aliases]\n"quay.io/x" = "quay.io/x"\n', "main", "must not contain a registry"),
    ('[aliases]\n"x:1" = "quay.io/x"\n', "main", "must not contain a tag"),
    ('[aliases]\n"x" = "x/y"\n', "main", "must name a registry and a repository"),
    ('[aliases]\n"x" = "quay.io/x:1"\n', "main", "must not contain a tag or digest"),
    ('[aliases]\n"x" = 3\n', "main", "must be a string"),
    ('aliases = ["x"]\n', "main", "[aliases] must be a table"),
    ('unqualified-search-registries = ["quay.io/ns"]\n', "main", "is not a host[:port]"),
    ('unqualified-search-registries = "quay.io"\n', "main", "must be a list"),
    ('short-name-mode = "strict"\n', "main", "short-name-mode 'strict'"),
    ('[aliases]\n"x" = "quay.io/x"\n"x" = "quay.io/y"\n', "drop-in", "cannot read it"),
    (b'\xff\xfe[aliases]\n', "drop-in", "not UTF-8"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "main", "cannot read it"),
    ('[registries.search]\nregistries = "quay.io"\n', "main", "must hold registries = ["),
    ('[registries.search]\nregistries = ["quay.io/ns"]\n', "main", "is not a host[:port]"),
    ('[registries.insecure]\nregistries = ["https://quay.io"]\n', "main", "without a URI scheme"),
    ('registries = ["quay.io"]\n', "main", "version 1 format"),
    ('[aliases]\n"y" = "quay.io/y"\n[registries.block]\nregistries = []\n', "main", "mixing sysregistry v1/v2"),
    ('[registries.insecure]\nregistries = ["quay.io"]\n', "drop-in", "must be in the version 2 format"),
])
def test_a_broken_file_is_one_line_naming_it(conf, tmp_path, text, where, says):
    conf('[aliases]\n"ok" = "quay.io/ok"\n')
    name = None if where == "main" else "50-bad.conf"
    if isinstance(text, bytes):
        target = conf("", name)
        target.write_bytes(text)
    else:
        target = conf(text, name)
    store = tmp_path / "s.sqlite"
    run_cli("images", db_path=store)
    before = store_dump(store)
    r = run_cli("pull", "-q", "x", db_path=store)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.output, r.output
    assert r.stderr.startswith(f"{target}: ") or f" {target}: " in r.stderr, r.stderr
    assert says in r.stderr
    assert store_dump(store) == before


def test_the_version_1_format_is_read_as_podman_converts_it(regs, empty, conf, tmp_path):
    """[registries.search] is the unqualified-search-registries, [registries.insecure]
    and [registries.block] [[registry]] entries with those flags (containers/image's
    ConvertToV2); only in the main file, and never mixed with version 2 keys."""
    plain = regs["plain"]
    R.seed(plain, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    v1 = (f'[registries.search]\nregistries = ["{empty.host}", "{plain.host}"]\n\n'
          f'[registries.insecure]\nregistries = ["{plain.host}", "{empty.host}/"]\n')
    main = conf(v1)
    store = tmp_path / "s.sqlite"
    e, p = empty.mark(), plain.mark()
    (out,) = _pull(store, "fx/sample2:1")  # plain HTTP: insecure, without --tls-verify=false
    assert out["id"] == ORACLE["sample2"]["config_digest"] and out["reference"] == f"{plain.host}/fx/sample2:1"
    assert _manifest_gets(empty, e) == [("GET", "/v2/fx/sample2/manifests/1", 404)]
    assert [s for m, path, s in _manifest_gets(plain, p)] == [200]
    # A version 2 drop-in still applies over it; a version 1 drop-in is refused, as podman does.
    conf('short-name-mode = "enforcing"\n', "10-mode.conf")
    r = run_cli("pull", "-q", "fx/sample2:1", db_path=tmp_path / "enf.sqlite")
    assert r.exit_code == 2 and "ambiguous" in r.stderr and str(main) in r.stderr, r.output
    (tmp_path / "registries.conf.d" / "10-mode.conf").unlink()
    bad = conf(f'[registries.block]\nregistries = ["{plain.host}"]\n', "20-v1.conf")
    before = store_dump(store)
    r = run_cli("pull", "-q", f"{plain.host}/fx/sample2:1", db_path=store)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
    assert r.stderr.startswith(f"layerdb: error: {bad}: ") and "version 2 format" in r.stderr
    bad.unlink()
    # Blocked: refused before any request, for pull, push and login.
    conf(v1 + f'\n[registries.block]\nregistries = ["{plain.host}"]\n')
    p = plain.mark()
    for args in (("pull", "-q", f"{plain.host}/fx/sample2:1"), ("push", "-q", f"{plain.host}/fx/sample2:1"),
                 ("login", "-u", R.USER, "-p", R.PASSWORD, plain.host)):
        r = run_cli(*args, db_path=store)
        assert r.exit_code == 2 and "blocked by registries.conf" in r.stderr and len(r.stderr.splitlines()) == 1
    assert plain.since(p) == [] and store_dump(store) == before
    # v1 and v2 in one file: podman's "mixing sysregistry v1/v2 is not supported", even with empty lists.
    for text in (v1 + f'\n[[registry]]\nlocation = "{plain.host}"\n',
                 'unqualified-search-registries = []\n\n[registries.search]\nregistries = []\n'):
        conf(text)
        r = run_cli("pull", "-q", f"{plain.host}/fx/sample2:1", db_path=store)
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
        assert f"{main}: " in r.stderr and "mixing sysregistry v1/v2 is not supported" in r.stderr
    assert store_dump(store) == before


def test_a_directory_named_like_a_drop_in_is_ignored(conf, tmp_path):
    from layerdb.engine.registry import shortnames

    conf('[aliases]\n"x" = "quay.io/x"\n')
    (tmp_path / "registries.conf.d" / "sub.conf").mkdir(parents=True)
    assert [str(c) for c in shortnames.resolve("x").candidates] == ["quay.io/x:latest"]


# login and logout --------------------------------------------------------------------


def test_login_honours_insecure_and_blocked_and_takes_a_namespace(regs, conf, tmp_path):
    token = regs["token"]  # plain HTTP with a token server: a login is checked for real
    auth = tmp_path / "auth.json"

    def login(*args, password=R.PASSWORD):
        return run_cli("login", "--authfile", str(auth), "-u", R.USER, "--password-stdin", *args,
                       input=f"{password}\n".encode())

    # Plain HTTP is refused while TLS is verified, unless registries.conf says the host is insecure.
    r = login(token.host)
    assert r.exit_code != 0 and len(r.stderr.splitlines()) == 1 and R.PASSWORD not in r.output, r.output
    conf(_insecure(token.host))
    r = login(token.host)
    assert r.exit_code == 0, r.output
    # HOST/NAMESPACE: credentials for that namespace only, under its own key (containers-auth.json(5)).
    r = login(f"{token.host}/team/app")
    assert r.exit_code == 0, r.output
    b64 = base64.b64encode(f"{R.USER}:{R.PASSWORD}".encode()).decode()
    assert json.loads(auth.read_text()) == {"auths": {token.host: {"auth": b64}, f"{token.host}/team/app": {"auth": b64}}}
    for bad in (f"{token.host}/team/app:1", "team/app", f"{token.host}/Team"):
        r = login(bad)
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.output
    r = run_cli("logout", "--authfile", str(auth), f"{token.host}/team/app")
    assert r.exit_code == 0 and json.loads(auth.read_text()) == {"auths": {token.host: {"auth": b64}}}
    # No REGISTRY: the first unqualified-search registry, as podman; none set: a clear error.
    r = run_cli("logout", "--authfile", str(auth))
    assert r.exit_code == 2 and "give a registry" in r.stderr and len(r.stderr.splitlines()) == 1
    conf(f'unqualified-search-registries = ["{token.host}", "quay.io"]\n\n' + _insecure(token.host))
    r = run_cli("logout", "--authfile", str(auth))
    assert r.exit_code == 0 and json.loads(auth.read_text()) == {"auths": {}}
    assert login().exit_code == 0 and list(json.loads(auth.read_text())["auths"]) == [token.host]
    # Blocked: refused before any request.
    conf(f'[[registry]]\nlocation = "{token.host}"\nblocked = true\n')
    m = token.mark()
    r = login(token.host)
    assert r.exit_code == 2 and "blocked by registries.conf" in r.stderr and token.since(m) == []
