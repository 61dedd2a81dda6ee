"""Fuzzing `LayerDB.import_archive` with mutated real archives (hypothesis).

Each example takes one of the repo's fixture archives, picks a target, and
applies a few byte mutations (flip, insert, delete, truncate) to it:

- outer:      the archive file itself;
- blob:       one layer blob as stored (gzip, zstd or plain tar), digests left as they are;
- layer-tar:  the uncompressed tar of one docker-save layer, with its diff_id in the config
              and every digest naming the config recomputed, so the mutated tar gets past
              the digest checks and reaches the tar reader and the importer;
- json:       manifest.json / index.json (no digest names them), or the config or the OCI
              manifest with every digest naming them recomputed;
- json-value: the same documents parsed, one value anywhere in them replaced by another
              JSON value (a list for a string, a number for an object, ...), digests recomputed.

The import must either succeed, and then every imported image must list and
export, or fail with a LayerdbError that has a message and leaves the store as
it was.  Any other exception is a bug and fails the test with hypothesis'
smallest example.  The default run is bounded and derandomized so the suite
stays fast and stable; tests/hostile/README.md says how to run it longer.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import REPO_FIXTURES
from hostile.storecheck import dump

sys.path.insert(0, str(Path(__file__).parent))
from archive_tools import ArchiveEditor, sha256_digest  # noqa: E402

SOURCES = ["opaque.oci.tar", "opaque.oci-zstd.tar", "opaque.docker.tar"]
EXAMPLES = int(os.environ.get("LAYERDB_FUZZ_EXAMPLES", "60"))

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(1, 600)),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
)


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        i = pos % (len(b) + 1)
        if op == "flip" and b:
            b[i % len(b)] ^= arg
        elif op == "insert":
            b[i:i] = arg
        elif op == "delete":
            del b[i : i + arg]
        elif op == "truncate":
            del b[i:]
    return bytes(b)


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def replace_value(doc, path: list[int], value):
    """doc with the value reached by following path (indexes, taken modulo) replaced."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    keys = sorted(doc) if isinstance(doc, dict) else list(range(len(doc)))
    k = keys[path[0] % len(keys)]
    doc[k] = replace_value(doc[k], path[1:], value)
    return doc


def build(source: str, target: str, pick: int, ops, dst: Path, value=None) -> Path:
    if target == "outer":
        dst.write_bytes(mutate((REPO_FIXTURES / "images" / source).read_bytes(), ops))
        return dst
    ed = ArchiveEditor(REPO_FIXTURES / "images" / source)
    layers = ed.layer_names()
    if target == "blob":
        name = layers[pick % len(layers)]
        ed.set(name, mutate(ed.read(name), ops))
    elif target == "layer-tar":
        # docker save layers are plain tars: mutate one and make the config vouch for it.
        docker = ArchiveEditor(REPO_FIXTURES / "images" / "opaque.docker.tar")
        i = pick % len(layers)
        name = docker.layer_names()[i]
        tar = mutate(docker.read(name), ops)
        docker.set(name, tar)
        cfg = docker.read_json(docker.config_name())
        cfg["rootfs"]["diff_ids"][i] = sha256_digest(tar)
        docker.replace_config(json.dumps(cfg, separators=(",", ":")).encode())
        ed = docker
    else:
        names = ["manifest.json"] if ed.kind == "docker" else ["index.json", "manifest"]
        names.append("config")
        which = names[pick % len(names)]
        name = {"config": ed.config_name, "manifest": ed.oci_manifest_name}.get(which, lambda: which)()
        data = ed.read(name)
        if target == "json-value":
            path = [pos for _, pos, _ in ops]
            data = json.dumps(replace_value(json.loads(data), path, value)).encode()
        else:
            data = mutate(data, ops)
        if which == "config":
            ed.replace_config(data)
        elif which == "manifest":
            ed.replace_oci_manifest(data)
        else:
            ed.set(which, data)
    return ed.write(dst)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="LAYERDB_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Found by this fuzzer: a docker-save manifest whose RepoTags is a number.
@example(source="opaque.docker.tar", target="json-value", pick=0, ops=[("flip", 0, 1), ("flip", 2, 1)], value=5)
@given(source=st.sampled_from(SOURCES), target=st.sampled_from(["outer", "blob", "layer-tar", "json", "json-value"]),
       pick=st.integers(0, 10), ops=st.lists(mutation, min_size=1, max_size=4), value=json_value)
def test_mutated_archives_fail_only_with_layerdb_errors(source, target, pick, ops, value):
    from layerdb.engine.api import LayerDB
    from layerdb.engine.errors import LayerdbError

    with tempfile.TemporaryDirectory(prefix="layerdb-fuzz-") as tmp:
        archive = build(source, target, pick, ops, Path(tmp) / "in.tar", value)
        store = Path(tmp) / "s.sqlite"
        with LayerDB(store) as db:
            empty = dump(store)
            try:
                res = db.import_archive(str(archive))
            except LayerdbError as e:
                assert e.message and e.message.strip(), f"{type(e).__name__} without a message"
                assert "\n" not in e.message, f"a multi-line message: {e.message!r}"
                assert dump(store) == empty, "a failed import changed the store"
                return
            # What was imported can be read back.
            for img in res.images:
                db.listing(img["id"], "/", recursive=True)
                db.export_tar(img["id"], io.BytesIO())
                db.history(img["id"])
