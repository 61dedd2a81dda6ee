"""REF resolution: tags, short names, ~N, image ids, chain ids and prefixes."""

from __future__ import annotations

import json

import pytest

from conftest import REPO_FIXTURES
from layerdb.engine.errors import AmbiguousRef, NotFound

INDEX = json.loads((REPO_FIXTURES / "oracle" / "sample" / "index.json").read_text())


@pytest.fixture
def sample(db):
    db.import_archive(str(REPO_FIXTURES / "images" / "sample.oci.tar"))
    return db


def chain_ids():
    return [l["chain_id"] for l in INDEX["layers"]]


def test_tag_from_the_archive(sample):
    r = sample.resolve("sample:1.0")
    assert [li.chain_id for li in r.layers] == chain_ids()
    assert r.image_digest == INDEX["config_digest"]


def test_short_name_without_registry(sample):
    sample.import_archive(str(REPO_FIXTURES / "images" / "sample.docker.tar"))  # localhost/sample:1.0
    assert sample.resolve("localhost/sample:1.0").image_digest == INDEX["config_digest"]


@pytest.mark.parametrize("n", [0, 1, 3, 5])
def test_tilde_goes_down_layers(sample, n):
    r = sample.resolve(f"sample:1.0~{n}")
    assert r.position == len(chain_ids()) - n
    assert r.chain_id == chain_ids()[-1 - n]


def test_tilde_below_the_bottom(sample):
    with pytest.raises(NotFound, match="below the bottom"):
        sample.resolve("sample:1.0~6")


def test_full_chain_id_and_prefix(sample):
    cid = chain_ids()[2]
    assert sample.resolve(cid).chain_id == cid
    assert sample.resolve(cid[7:19]).chain_id == cid
    assert sample.resolve(cid[7:13]).position == 3
    assert sample.resolve(cid + "~1").chain_id == chain_ids()[1]


def test_image_id_prefix(sample):
    assert sample.resolve(INDEX["config_digest"][7:19]).image_digest == INDEX["config_digest"]


def test_prefix_too_short_is_unknown(sample):
    with pytest.raises(NotFound):
        sample.resolve(chain_ids()[0][7:11])


def test_unknown_ref(sample):
    with pytest.raises(NotFound, match="no image, layer or container matches 'nope:1'"):
        sample.resolve("nope:1")


def test_ambiguous_short_name_lists_candidates(db):
    db.import_archive(str(REPO_FIXTURES / "images" / "opaque.oci.tar"), tag="a.example/opaque:1")
    db.import_archive(str(REPO_FIXTURES / "images" / "sample.oci.tar"), tag="b.example/opaque:1")
    with pytest.raises(AmbiguousRef) as e:
        db.resolve("opaque:1")
    assert "a.example/opaque:1" in str(e.value) and "b.example/opaque:1" in str(e.value)
