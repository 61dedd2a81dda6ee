"""Every view of every fixture image equals an independent oracle, line for line.

The oracles come from containers/storage (buildah pull into a vfs store) and
umoci, never from layerdb: see tests/fixtures/README.md and
../shared/fixtures/README.md.
"""

from __future__ import annotations

import json
import tarfile

import pytest

from conftest import (REPO_FIXTURES, SHARED_FIXTURES, export_bytes, manifest_of_dir, manifest_of_tar_bytes,
                      oracle_lines, oracle_positions)


def _cases(root):
    if not (root / "images").is_dir():
        return []
    out = []
    for archive in sorted((root / "images").glob("*.tar")):
        name = archive.name.split(".")[0]
        if ".multi." in archive.name:
            with tarfile.open(archive) as t:
                manifest = json.load(t.extractfile("manifest.json"))
            for m in manifest:
                tag = m["RepoTags"][0]
                out.append(pytest.param(archive, tag.split("/")[-1].split(":")[0], tag, None, id=f"{archive.name}:{tag}"))
        else:
            out.append(pytest.param(archive, name, f"fixture/{name}:t", f"fixture/{name}:t", id=archive.name))
    return out


def _check_all_positions(db, archive, oracle_dir, ref, tag, tmp_path):
    db.import_archive(str(archive), tag=tag)
    positions = oracle_positions(oracle_dir)
    assert positions, f"no oracle for {archive}"
    top = max(positions)
    assert db.resolve(ref).position == top
    for pos in positions:
        got = manifest_of_tar_bytes(export_bytes(db, f"{ref}~{top - pos}"), tmp_path)
        want = oracle_lines(oracle_dir, pos)
        assert got == want, f"{archive.name} position {pos} differs from the oracle"


@pytest.mark.parametrize("archive,oracle,ref,tag", _cases(REPO_FIXTURES))
def test_repo_fixture_views_match_oracle(db, archive, oracle, ref, tag, tmp_path):
    _check_all_positions(db, archive, REPO_FIXTURES / "oracle" / oracle, ref, tag, tmp_path)


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="../shared/fixtures is not beside the checkout (CI has it)")
@pytest.mark.parametrize("archive,oracle,ref,tag", _cases(SHARED_FIXTURES))
def test_shared_fixture_views_match_oracle(db, archive, oracle, ref, tag, tmp_path):
    _check_all_positions(db, archive, SHARED_FIXTURES / "oracle" / oracle, ref, tag, tmp_path)


def test_export_dir_matches_oracle(db, tmp_path):
    archive = REPO_FIXTURES / "images" / "sample.oci.tar"
    oracle = REPO_FIXTURES / "oracle" / "sample"
    db.import_archive(str(archive), tag="s:1")
    top = max(oracle_positions(oracle))
    for pos in (1, top):
        out = tmp_path / f"root{pos}"
        db.export_dir(f"s:1~{top - pos}", str(out))
        got = manifest_of_dir(out)
        # Directory listings on disk cannot keep symlink mtimes from tar on every
        # filesystem, but they can here; compare everything.
        assert got == oracle_lines(oracle, pos)


def test_export_dir_refuses_non_empty_target(db, tmp_path):
    from layerdb.engine.errors import UsageError

    db.import_archive(str(REPO_FIXTURES / "images" / "opaque.oci.tar"), tag="o:1")
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(UsageError):
        db.export_dir("o:1", str(target))
    assert sorted(p.name for p in target.iterdir()) == ["keep"]


def test_export_rereads_packs_it_had_to_drop(db, tmp_path, monkeypatch):
    """With no room to keep decoded packs, every later file of a pack is read again
    from the store; the export is still exactly the oracle's view."""
    from layerdb.engine.output import export

    monkeypatch.setattr(export, "HELD_BYTES", 0)
    archive = REPO_FIXTURES / "images" / "sample.oci.tar"
    oracle = REPO_FIXTURES / "oracle" / "sample"
    db.import_archive(str(archive), tag="s:1")
    top = max(oracle_positions(oracle))
    assert manifest_of_tar_bytes(export_bytes(db, "s:1"), tmp_path) == oracle_lines(oracle, top)


@pytest.mark.parametrize("root", [REPO_FIXTURES, SHARED_FIXTURES], ids=["repo", "shared"])
def test_fast_replays_are_apply(db, root):
    """chain_view and replay put most nodes themselves: every image at every
    position gives the nodes, children and metadata apply() gives event by event."""
    from conftest import fixture_archives
    from layerdb.engine import refs
    from layerdb.engine.replay import Node, View, chain_events, chain_view

    archives = fixture_archives(root)
    if not archives:
        pytest.skip(f"{root} is absent")
    for a in archives:
        db.import_archive(str(a))
    state = lambda v: ({p: tuple(getattr(n, s) for s in Node.__slots__) for p, n in v.nodes.items()},  # noqa: E731
                       v.children)
    checked = 0
    with db.store.read():
        for img in db.images():
            for k in range(img["layers"]):
                chain = refs.resolve(db.store, f"{img['id']}~{k}").chain
                one_by_one = View()
                for ev in chain_events(db.store.conn, chain):
                    one_by_one.apply(ev)
                want = state(one_by_one)
                assert state(chain_view(db.store.conn, chain)) == want
                assert state(View().replay(chain_events(db.store.conn, chain))) == want
                checked += 1
    assert checked > len(archives)
