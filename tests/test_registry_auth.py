"""Client certificates, a Bearer token that runs out during a transfer, and OAuth2 refresh tokens,
against the real registry (tests/registry_env.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import REPO_FIXTURES, export_bytes, manifest_of_tar_bytes, oracle_lines, oracle_positions, run_cli

import registry_env as R
from registry_env import INSECURE, ORACLE, SAMPLE, SAMPLE2

pytestmark = R.NEEDS
regs = R.regs  # the shared registries, a session fixture


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    """A TLS registry that requires a client certificate signed by its client CA."""
    root = tmp_path_factory.mktemp("mtls")
    ca, cert, key = R.client_certificate(root / "client")
    reg = R.start_registry(root / "reg", tls=True, client_cas=[ca])
    good = root / "certs"  # a --cert-dir: the server's CA and the client certificate
    good.mkdir()
    shutil.copy(reg.ca / "ca.crt", good / "ca.crt")
    shutil.copy(cert, good / "client.cert")
    shutil.copy(key, good / "client.key")
    R.skopeo_copy(f"oci-archive:{SAMPLE2}", f"docker://{reg.host}/fx/sample2:1", "--dest-cert-dir", str(good))
    yield reg, good
    reg.stop()


def _views_match(db_path, ref, name, tmp_path):
    from layerdb.engine.api import LayerDB

    oracle_dir = REPO_FIXTURES / "oracle" / name
    positions = oracle_positions(oracle_dir)
    top = max(positions)
    with LayerDB(db_path) as db:
        assert db.images()[0]["id"] == ORACLE[name]["config_digest"]
        for pos in positions:
            got = manifest_of_tar_bytes(export_bytes(db, f"{ref}~{top - pos}"), tmp_path)
            assert got == oracle_lines(oracle_dir, pos), f"{ref} position {pos} differs from the oracle"


# Client certificates --------------------------------------------------------------------


def test_client_certificate_from_cert_dir(mtls, tmp_path):
    reg, good = mtls
    ref = f"{reg.host}/fx/sample2:1"
    store = tmp_path / "s.sqlite"
    # The server's CA alone: the registry refuses the handshake without a client certificate.
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(reg.ca / "ca.crt", ca_only / "ca.crt")
    r = run_cli("pull", "-q", "--cert-dir", str(ca_only), ref, db_path=store)
    assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "Traceback" not in r.output and "it requires a client certificate" in r.stderr and "*.cert" in r.stderr
    # A client certificate another CA signed is refused too.
    _, other_cert, other_key = R.client_certificate(tmp_path / "other")
    wrong = tmp_path / "wrong"
    shutil.copytree(ca_only, wrong)
    shutil.copy(other_cert, wrong / "client.cert")
    shutil.copy(other_key, wrong / "client.key")
    r = run_cli("pull", "-q", "--cert-dir", str(wrong), ref, db_path=store)
    assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"the client certificate from {wrong} was refused" in r.stderr
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        assert db.images() == [] and db.store.scalar("SELECT count(*) FROM manifest") == 0
    r = run_cli("pull", "-q", "--cert-dir", str(good), ref, db_path=store)
    assert r.exit_code == 0, r.output
    _views_match(store, ref, "sample2", tmp_path)


def test_client_certificate_from_the_per_host_certs_d(mtls, tmp_path, monkeypatch):
    reg, good = mtls
    ref = f"{reg.host}/fx/sample2:1"
    d = tmp_path / "config" / "containers" / "certs.d" / reg.host
    shutil.copytree(good, d)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    store = tmp_path / "s.sqlite"
    r = run_cli("pull", "-q", ref, db_path=store)
    assert r.exit_code == 0, r.output
    _views_match(store, ref, "sample2", tmp_path)
    # Push back under another name through the same certificates: the digest stays.
    r = run_cli("push", "-q", ref, f"{reg.host}/copy/sample2:1", "--preserve-digests", "--json", db_path=store)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["digest"] == ORACLE["sample2"]["manifest_digest"]
    # Without the client certificate in the directory, the same pull fails in one line.
    (d / "client.cert").unlink()
    (d / "client.key").unlink()
    r = run_cli("pull", "-q", ref, db_path=tmp_path / "s2.sqlite")
    assert r.exit_code == 7 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "it requires a client certificate" in r.stderr


# Tokens -----------------------------------------------------------------------------------


def test_a_token_that_runs_out_during_a_blob_is_renewed_for_the_resume(regs, tmp_path):
    """The first token dies at the registry while the big layer downloads; the connection
    drops after that; the Range resume gets a 401, a new token, and finishes the blob."""
    tok, ts = regs["token"], regs["tokens"]
    R.seed(tok, f"oci-archive:{SAMPLE}", "fx/sample:1.0")
    front = R.FaultProxy(tok.host)
    big = ORACLE["sample"]["layers"][0]["digest"]
    store = tmp_path / "s.sqlite"
    try:
        # Every token dies at the registry 5 s after it is issued; the big layer's
        # connection hangs for 8 s after 300 kB, then drops.
        front.add(R.Fault("drop", match=big, at=300_000, stall=8.0))
        ts.short_life, ts.short_next = 5.0, 1000
        n = len(ts.requests)
        ref = f"{front.host}/fx/sample:1.0"
        r = run_cli("pull", "-q", *INSECURE, ref, db_path=store)
        assert r.exit_code == 0, r.output
        got = [(s, k) for m, p, s, k in front.log if big in p]
        assert got[got.index((200, "drop")) + 1:] == [(401, "pass"), (206, "pass")], got
        assert len(ts.requests) - n >= 2  # the first token, and a new one for the resume
    finally:
        ts.short_next = 0
        front.stop()
    _views_match(store, ref, "sample", tmp_path)


def test_oauth2_refresh_token_from_the_auth_file(regs, tmp_path):
    tok, ts = regs["token"], regs["tokens"]
    ref = R.seed(tok, f"oci-archive:{SAMPLE2}", "fx/sample2:1")
    store = tmp_path / "s.sqlite"
    assert run_cli("pull", "-q", *INSECURE, ref, db_path=store).exit_code == 0
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {tok.host: {"identitytoken": R.REFRESH_TOKEN}}}))
    n = len(ts.requests)
    dest = f"{tok.host}/oauth/sample2:1"
    r = run_cli("push", "-q", *INSECURE, "--authfile", str(auth), ref, dest, "--json", db_path=store)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["digest"] == ORACLE["sample2"]["manifest_digest"]
    posts = [q for q in ts.requests[n:] if "grant" in q]
    assert posts and all(q["grant"] == "refresh_token" and not q["denied"] and q["client_id"] == "layerdb"
                         and q["service"] == R.SERVICE and q["scope_fields"] == 1 for q in posts)
    assert any("repository:oauth/sample2:pull,push" in q["scopes"] for q in posts)
    assert not [q for q in ts.requests[n:] if "grant" not in q]  # never the GET form with a password
    # A refresh token the server does not know: one line naming where it came from, never the token.
    auth.write_text(json.dumps({"auths": {tok.host: {"identitytoken": "rt-revoked-98765"}}}))
    r = run_cli("push", "-q", *INSECURE, "--authfile", str(auth), ref, f"{tok.host}/oauth/sample2:2", db_path=store)
    assert r.exit_code == 8 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"token server refused the identity token from {auth}" in r.stderr and "rt-revoked" not in r.stderr
