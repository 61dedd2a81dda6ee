"""push of an index: an image pulled with --all-platforms goes back as the same index digest.

The oracle is the registry: `skopeo inspect --raw` of the source index and of
each of its manifests, compared byte for byte with what the destination serves.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from conftest import run_cli

import registry_env as R
from registry_env import INSECURE, MULTI, ORACLE

pytestmark = R.NEEDS
regs = R.regs  # the shared registries, a session fixture


def _raw(ref: str, *args: str) -> bytes:
    args = args or INSECURE
    return subprocess.run(["skopeo", "inspect", "--raw", *args, f"docker://{ref}"], capture_output=True,
                          check=True).stdout


def _digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


@pytest.fixture
def source(regs):
    ref = R.seed(regs["plain"], f"oci-archive:{MULTI}:multi:1.0", "fx/multi:1.0", "--all")
    name = ref.rsplit(":", 1)[0]
    index = _raw(ref)
    children = {d["digest"]: _raw(f"{name}@{d['digest']}") for d in json.loads(index)["manifests"]}
    return ref, index, children


def _push(store, *args):
    r = run_cli("push", "-q", *args, "--json", db_path=store)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_all_platforms_pushes_back_as_the_same_index(regs, source, tmp_path):
    plain = regs["plain"]
    ref, index, children = source
    store = tmp_path / "s.sqlite"
    assert run_cli("pull", "-q", *INSECURE, "--all-platforms", ref, db_path=store).exit_code == 0
    dest = f"{plain.host}/promoted/multi:1"
    mark = plain.mark()
    out = _push(store, *INSECURE, ref, dest, "--preserve-digests")
    assert (out["digest"], out["kept"], out["previous"], out["images"]) == (_digest(index), True, None, 2)
    assert _raw(dest) == index  # the same bytes, so the same digest
    for d, data in children.items():
        assert _raw(f"{plain.host}/promoted/multi@{d}") == data
    # Every blob came by a cross-repository mount; none was uploaded.
    reqs = plain.since(mark)
    assert not [p for m, p, s in reqs if m == "PATCH" or (m == "PUT" and "/blobs/" in p)]
    blobs = {x["digest"] for m in children.values() for x in json.loads(m)["layers"]}
    blobs |= {json.loads(m)["config"]["digest"] for m in children.values()}
    assert out["mounted"] == len(blobs) and out["uploaded"] == 0
    # The index manifest went under the tag, each image under its digest.
    puts = sorted(p.rsplit("/", 1)[1] for m, p, s in reqs if m == "PUT" and "/manifests/" in p and s == 201)
    assert puts == sorted(["1", *children])
    # Pushed again, nothing moves and the digest stays.
    out = _push(store, *INSECURE, ref, dest)
    assert (out["digest"], out["existed"], out["mounted"], out["uploaded"]) == (_digest(index), len(blobs), 0, 0)


def test_an_index_pushed_where_its_blobs_are_not_gets_new_digests_or_fails(regs, source, tmp_path):
    tls = regs["tls"]
    ref, index, children = source
    store = tmp_path / "s.sqlite"
    assert run_cli("pull", "-q", *INSECURE, "--all-platforms", ref, db_path=store).exit_code == 0
    creds = ("--cert-dir", str(tls.ca), "--creds", f"{R.USER}:{R.PASSWORD}")
    dest = f"{tls.host}/copied/multi:1"
    r = run_cli("push", "-q", *creds, ref, dest, "--preserve-digests", db_path=store)
    assert r.exit_code == 7 and "--preserve-digests" in r.stderr and len(r.stderr.splitlines()) == 1
    out = _push(store, *creds, ref, dest)
    assert out["previous"] == _digest(index) and out["images"] == 2
    got = _raw(dest, *creds)
    assert _digest(got) == out["digest"]
    doc, was = json.loads(got), json.loads(index)
    assert doc["mediaType"] == was["mediaType"]
    assert [d["platform"] for d in doc["manifests"]] == [d["platform"] for d in was["manifests"]]
    configs = []
    for d in doc["manifests"]:
        m = _raw(f"{tls.host}/copied/multi@{d['digest']}", *creds)
        assert _digest(m) == d["digest"] and len(m) == d["size"]
        configs.append(json.loads(m)["config"]["digest"])
    assert configs == [json.loads(children[d["digest"]])["config"]["digest"] for d in was["manifests"]]
    # skopeo copies every platform back; the archive imports as the two original images.
    back = tmp_path / "back.tar"
    R.skopeo_copy(f"docker://{dest}", f"oci-archive:{back}", "--all", "--src-cert-dir", str(tls.ca),
                  "--src-creds", f"{R.USER}:{R.PASSWORD}")
    s2 = tmp_path / "s2.sqlite"
    for plat in ("linux/amd64", "linux/arm64"):
        r = run_cli("import", str(back), "--platform", plat, db_path=s2)
        assert r.exit_code == 0, r.output
    from layerdb.engine.api import LayerDB

    with LayerDB(s2) as db:
        assert sorted(i["id"] for i in db.images()) == sorted(
            [ORACLE["sample"]["config_digest"], ORACLE["opaque"]["config_digest"]])


def test_one_platform_pushes_alone_unless_the_rest_is_at_the_destination(regs, source, tmp_path):
    plain = regs["plain"]
    ref, index, children = source
    store = tmp_path / "s.sqlite"
    r = run_cli("pull", "-q", *INSECURE, "--platform", "linux/arm64", ref, "--json", db_path=store)
    assert r.exit_code == 0, r.output
    arm64 = json.loads(r.stdout)["manifest"]
    # A new repository lacks the amd64 image: the arm64 image goes alone, under its own digest.
    out = _push(store, *INSECURE, ref, f"{plain.host}/single/multi:1")
    assert (out["digest"], out["images"], out["kept"]) == (arm64, 1, True)
    assert _raw(f"{plain.host}/single/multi:1") == children[arm64]
    # Back to where it came from, the amd64 image is there: the tag keeps naming the index.
    out = _push(store, *INSECURE, ref)
    assert (out["destination"], out["digest"], out["images"]) == (ref, _digest(index), 1)
    assert _raw(ref) == index
