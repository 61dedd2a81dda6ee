"""Multi-platform OCI indexes: the machine's platform by default, --platform otherwise."""

from __future__ import annotations

import json

import pytest

from conftest import REPO_FIXTURES, export_bytes, manifest_of_tar_bytes, oracle_lines, oracle_positions, run_cli
from layerdb.engine.ingest.archive import machine_platform
from layerdb.engine.errors import ArchiveError

MULTI = REPO_FIXTURES / "multiplatform" / "multi.oci.tar"
SAMPLE = json.loads((REPO_FIXTURES / "oracle" / "sample" / "index.json").read_text())
OPAQUE = json.loads((REPO_FIXTURES / "oracle" / "opaque" / "index.json").read_text())


def _top_matches(db, ref, oracle, tmp_path):
    top = max(oracle_positions(oracle))
    assert manifest_of_tar_bytes(export_bytes(db, ref), tmp_path) == oracle_lines(oracle, top)


@pytest.mark.skipif(machine_platform()[1] != "amd64", reason="the default pick is checked on amd64 machines")
def test_default_platform_is_the_machines(db, tmp_path):
    res = db.import_archive(str(MULTI))
    assert [i["id"] for i in res.images] == [SAMPLE["config_digest"]]
    assert db.images()[0]["repo_tags"] == ["multi:1.0"]
    _top_matches(db, "multi:1.0", REPO_FIXTURES / "oracle" / "sample", tmp_path)


def test_platform_option_picks_the_other_image(db, tmp_path):
    res = db.import_archive(str(MULTI), platform="linux/arm64")
    assert [i["id"] for i in res.images] == [OPAQUE["config_digest"]]
    _top_matches(db, "multi:1.0", REPO_FIXTURES / "oracle" / "opaque", tmp_path)
    db2_res = db.import_archive(str(MULTI), platform="linux/arm64/v8")
    assert [i["id"] for i in db2_res.images] == [OPAQUE["config_digest"]]


def test_unknown_platform_lists_what_the_index_has(tmp_path):
    p = tmp_path / "s.sqlite"
    r = run_cli("import", str(MULTI), "--platform", "linux/s390x", db_path=p)
    assert r.exit_code == ArchiveError.exit_code
    assert r.stderr.startswith("layerdb: error: ") and r.stderr.count("\n") == 1
    assert "linux/amd64" in r.stderr and "linux/arm64/v8" in r.stderr and "--platform" in r.stderr


def test_malformed_platform_option(tmp_path):
    r = run_cli("import", str(MULTI), "--platform", "amd64", db_path=tmp_path / "s.sqlite")
    assert r.exit_code == ArchiveError.exit_code and "OS/ARCH" in r.stderr
