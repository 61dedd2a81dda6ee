"""Every stored diff rebuilds to its original tar, byte for byte (sha256 == diff_id)."""

from __future__ import annotations

import hashlib

import pytest

from conftest import REPO_FIXTURES, SHARED_FIXTURES


def _archives():
    out = sorted((REPO_FIXTURES / "images").glob("*.tar"))
    if SHARED_FIXTURES.is_dir():
        out += sorted((SHARED_FIXTURES / "images").glob("*.tar"))
    return [pytest.param(a, id=a.name) for a in out]


@pytest.mark.parametrize("archive", _archives())
def test_layers_rebuild_byte_for_byte(db, archive):
    db.import_archive(str(archive))
    diff_ids = [r[0] for r in db.store.execute("SELECT diff_id FROM diff")]
    assert diff_ids
    for d in diff_ids:
        h = hashlib.sha256()
        n = 0
        for piece in db.layer_tar(d):
            h.update(piece)
            n += len(piece)
        assert "sha256:" + h.hexdigest() == d
        assert n == db.store.scalar("SELECT tar_size FROM diff WHERE diff_id = ?", (d,))
