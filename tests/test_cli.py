"""The command line: every command end to end, JSON keys, and error lines."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO_FIXTURES, load_json_lines, oracle_lines, run_cli

SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
ORACLE = REPO_FIXTURES / "oracle" / "sample"
INDEX = json.loads((ORACLE / "index.json").read_text())


@pytest.fixture
def store(tmp_path):
    p = tmp_path / "cli.sqlite"
    r = run_cli("import", str(SAMPLE), db_path=p)
    assert r.exit_code == 0, r.output
    assert "Loaded image: sample:1.0" in r.stdout
    return p


def oracle_entry(pos, path):
    for line in oracle_lines(ORACLE, pos):
        e = json.loads(line)
        if e["path"] == path.lstrip("/"):
            return e
    return None


def test_every_command_has_help():
    from layerdb.cli.main import cli

    for name, cmd in cli.load_all().items():
        assert cmd.help, name
        r = run_cli(name, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output


def test_commands_load_from_the_modules_the_group_names():
    """Starting loads no command module; each command comes from the module
    base.COMMAND_MODULES names, and every registered command is in that map."""
    code = """
import sys
from layerdb.cli.main import cli
from layerdb.cli.base import COMMAND_MODULES
assert not [m for m in sys.modules if m.endswith('_cmds')], sorted(sys.modules)
for name, module in sorted(COMMAND_MODULES.items()):
    cmd = cli.get_command(None, name)
    assert cmd is not None, name
    assert cmd.callback is None or cmd.callback.__module__ == 'layerdb.cli.' + module, (name, cmd.callback.__module__)
assert set(cli.load_all()) == set(COMMAND_MODULES), set(cli.commands) ^ set(COMMAND_MODULES)
assert cli.list_commands(None) == sorted(COMMAND_MODULES)
print('ok')
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr


def test_a_bare_boolean_flag_is_true_and_takes_no_word_but_a_boolean():
    from layerdb.cli.base import bare_bool_flags

    assert bare_bool_flags(["--tls-verify", "localhost:5000/a:1"]) == ["--tls-verify=true", "localhost:5000/a:1"]
    assert bare_bool_flags(["a:1", "--tls-verify"]) == ["a:1", "--tls-verify=true"]
    assert bare_bool_flags(["--tls-verify", "-q", "a"]) == ["--tls-verify=true", "-q", "a"]
    assert bare_bool_flags(["--tls-verify", "False", "a"]) == ["--tls-verify", "False", "a"]
    assert bare_bool_flags(["--tls-verify=false", "a"]) == ["--tls-verify=false", "a"]
    assert bare_bool_flags(["a", "--", "--tls-verify"]) == ["a", "--", "--tls-verify"]


def test_bare_layerdb_prints_its_help_and_succeeds(tmp_path):
    """As podman and docker do: help on stdout, exit 0, nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "LAYERDB_DB"}
    p = subprocess.run([sys.executable, "-m", "layerdb.cli"], capture_output=True, env=env, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == b"", (p.returncode, p.stderr)
    out = p.stdout.decode()
    assert out.startswith("Usage: layerdb [OPTIONS] COMMAND [ARGS]...") and "error" not in out.lower()
    for command in ("import", "pull", "push", "build", "explore", "export", "log"):
        assert f"\n  {command} " in out, command
    # A command that is not there is still an error, with its one line and exit 2.
    bad = subprocess.run([sys.executable, "-m", "layerdb.cli", "no-such-command"], capture_output=True, env=env)
    assert bad.returncode == 2 and bad.stderr.decode().startswith("layerdb: error: ")


def test_images_json(store):
    (img,) = load_json_lines(run_cli("images", "--json", db_path=store).stdout)
    assert img["id"] == INDEX["config_digest"]
    assert img["repo_tags"] == ["sample:1.0"]
    assert img["layers"] == 6
    top = [json.loads(l) for l in oracle_lines(ORACLE, 6)]
    # size: regular-file bytes of every layer's diff (what docker images reports, uncompressed)
    assert img["size"] > sum(e.get("size", 0) for e in top) // 2
    assert set(img) >= {"id", "repo_tags", "layers", "size", "created"}


def test_history_json_matches_config(store):
    rows = load_json_lines(run_cli("history", "sample:1.0", "--json", db_path=store).stdout)
    hist = INDEX["history"]
    assert len(rows) == len(hist)
    rows.reverse()  # newest first, like docker history
    for r, h in zip(rows, hist):
        assert r["created_by"] == h["created_by"]
        assert r["empty_layer"] == bool(h.get("empty_layer"))
        if r["empty_layer"]:
            assert r["position"] is None and r["layer_id"] is None
        else:
            layer = INDEX["layers"][r["position"] - 1]
            assert r["layer_id"] == layer["chain_id"] and r["diff_id"] == layer["diff_id"]


def test_history_table(store):
    out = run_cli("history", "sample:1.0", db_path=store).stdout.splitlines()
    assert out[0].split()[:3] == ["LAYER", "CREATED", "CREATED"]
    assert out[1].startswith("<missing>")
    assert out[-1].startswith(INDEX["layers"][0]["chain_id"][7:19])


def test_view_long_json_matches_oracle(store):
    rows = load_json_lines(run_cli("view", "--at", "sample:1.0~2", "-R", "-l", "--json", "/", db_path=store).stdout)
    want = [json.loads(l) for l in oracle_lines(ORACLE, 4)]
    assert [r["path"] for r in rows] == ["/" + e["path"] for e in want]
    for r, e in zip(rows, want):
        assert (r["type"], r["mode"], r["uid"], r["gid"]) == (e["type"], e["mode"] if e["type"] != "l" else r["mode"], e["uid"], e["gid"])
        if e["type"] == "f":
            assert (r["size"], r["sha256"]) == (e["size"], e["sha256"])
        if e["type"] == "l":
            assert r["link"] == e["link"]
        assert r["layer_id"] in {l["chain_id"] for l in INDEX["layers"][:4]}


def test_view_lists_one_directory(store):
    out = run_cli("view", "--at", "sample:1.0", "/app", db_path=store).stdout.split()
    want = sorted(e["path"].split("/")[-1] + ("/" if e["type"] == "d" else "")
                  for e in map(json.loads, oracle_lines(ORACLE, 6)) if e["path"].count("/") == 1 and e["path"].startswith("app/"))
    assert out == want


def test_cat_bytes_match_oracle_at_every_position(store):
    for pos in range(1, 7):
        e = oracle_entry(pos, "/etc/passwd")
        r = run_cli("cat", "--at", f"sample:1.0~{6 - pos}", "/etc/passwd", db_path=store)
        assert hashlib.sha256(r.stdout_bytes).hexdigest() == e["sha256"]


def test_cat_of_hard_link_and_missing_file(store):
    e = oracle_entry(6, "/app/version.txt")
    r = run_cli("cat", "--at", "sample:1.0", "/app/version.txt", db_path=store)
    assert hashlib.sha256(r.stdout_bytes).hexdigest() == e["sha256"]
    r = run_cli("cat", "--at", "sample:1.0", "/app/docs/README.txt", db_path=store)
    assert r.exit_code == 5 and "no such file" in r.stderr


def test_cat_of_a_directory_is_an_error(store):
    r = run_cli("cat", "--at", "sample:1.0", "/app", db_path=store)
    assert r.exit_code != 0 and r.stderr.strip() == "layerdb: error: /app: is a directory at sample:1.0"


def test_log_json_keys(store):
    rows = load_json_lines(run_cli("log", "/etc/passwd", "--image", "sample:1.0", "--json", db_path=store).stdout)
    assert [r["op"] for r in rows] == ["add", "modify"]
    for r in rows:
        assert set(r) >= {"image", "position", "layer_id", "op", "via", "type", "mode", "size", "sha256", "created_by"}
    assert rows[1]["created_by"].startswith("/bin/sh -c echo 'app:x:1000:1000:demo app:/app:/bin/sh' >> /etc/passwd")
    assert rows[1]["sha256"] == oracle_entry(3, "/etc/passwd")["sha256"]


def test_export_to_stdout_and_file_are_identical(store, tmp_path):
    r = run_cli("export", "--at", "sample:1.0", "-o", "-", db_path=store)
    f = tmp_path / "v.tar"
    assert run_cli("export", "--at", "sample:1.0", "-o", str(f), db_path=store).exit_code == 0
    assert f.read_bytes() == r.stdout_bytes
    with tarfile.open(fileobj=io.BytesIO(r.stdout_bytes)) as t:
        links = {m.name: m.linkname for m in t if m.islnk()}
    # both names of the hard-linked pair are in the tar, so the second is a tar hard link
    assert links == {"app/version.txt": "app/VERSION"} or links == {"app/VERSION": "app/version.txt"}


def test_unknown_ref_is_one_error_line(store):
    r = run_cli("view", "--at", "nope", db_path=store)
    assert r.exit_code == 5
    assert r.stderr == "layerdb: error: no image, layer or container matches 'nope' (see `layerdb images`)\n"


def test_import_twice_adds_nothing(store):
    r = run_cli("import", str(SAMPLE), "--json", db_path=store)
    (row,) = load_json_lines(r.stdout)
    assert row["new"] is False


def test_cli_runs_as_a_module_and_fails_cleanly(tmp_path):
    p = subprocess.run([sys.executable, "-m", "layerdb.cli", "--db", str(tmp_path / "x.sqlite"), "cat", "--at",
                        "missing:1", "/etc/passwd"], capture_output=True, text=True)
    assert p.returncode == 5
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_export_to_dev_null_keeps_the_device(store):
    import os
    import stat

    assert run_cli("export", "--at", "sample:1.0", "-o", os.devnull, db_path=store).exit_code == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_export_of_a_damaged_large_file_fails_with_one_line(store, tmp_path):
    """busybox is cut into chunks and read ahead on a helper thread: a damaged chunk
    still stops the export with one error line and leaves no file behind."""
    import apsw

    conn = apsw.Connection(str(store))
    sha, size, codec, data = conn.execute(
        """SELECT c.sha256, c.size, c.codec, c.data FROM blob_chunk bc JOIN chunk c ON c.sha256 = bc.chunk
           ORDER BY bc.blob_id, bc.seq LIMIT 1 OFFSET 1""").fetchone()
    raw = bytearray(data if codec == 0 else __import__("zstandard").ZstdDecompressor().decompress(data, max_output_size=size))
    raw[100] ^= 0xFF
    conn.execute("UPDATE chunk SET codec = 0, data = ? WHERE sha256 = ?", (bytes(raw), sha))
    conn.close()
    out = tmp_path / "v.tar"
    r = run_cli("export", "--at", "sample:1.0", "-o", str(out), db_path=store)
    assert r.exit_code == 6
    assert r.stderr.count("\n") == 1 and "sha256 mismatch" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".layerdb-*"))


def test_cat_of_a_large_file_with_a_missing_chunk_fails_with_one_line(store):
    """Chunks are fetched ahead of the reader; a missing one is reported when the
    reader reaches it, as one line, and the chunks before it went out intact."""
    import apsw

    conn = apsw.Connection(str(store))
    blob_id, seq, offset, sha = conn.execute(
        """SELECT bc.blob_id, bc.seq, bc.offset, bc.chunk FROM blob_chunk bc
           WHERE bc.seq = 2 ORDER BY bc.blob_id LIMIT 1""").fetchone()
    path = conn.execute(
        """SELECT p.path FROM event e JOIN path p ON p.id = e.path_id WHERE e.blob_id = ? LIMIT 1""",
        (blob_id,)).fetchone()[0]
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("DELETE FROM chunk WHERE sha256 = ?", (sha,))
    conn.close()
    r = run_cli("cat", "--at", "sample:1.0", "/" + bytes(path).decode(), db_path=store)
    assert r.exit_code == 6
    assert r.stderr.count("\n") == 1 and f"chunk {sha.hex()} is missing" in r.stderr
    assert len(r.stdout_bytes) == offset


@pytest.mark.parametrize("args", [
    ["view", "-R", "--at", "big:1", "/"],
    ["view", "-R", "--json", "--at", "big:1", "/"],
    ["diff", "big:1~1", "big:1"],
    ["history", "--changes", "big:1"],
    ["export", "--at", "big:1", "-o", "-"],
], ids=["view", "view-json", "diff", "changes", "export"])
def test_reader_leaving_early_is_not_an_error(tmp_path, args):
    """`layerdb view -R ... | head`: the command stops quietly with status 0,
    and the stream it left (a read transaction) ends before the store closes."""
    from hostile.make_hostile import entry
    from test_export_memory import _stacked

    arch = _stacked(tmp_path, ("base", [entry(f"dir{i % 9}/file-with-a-long-name-{i}", b"%d\n" % i)
                                        for i in range(4000)]),
                    ("more", [entry(f"dir{i % 9}/file-with-a-long-name-{i}", b"v2\n") for i in range(0, 4000, 2)]))
    db = tmp_path / "s.sqlite"
    assert run_cli("import", str(arch), "--tag", "big:1", db_path=db).exit_code == 0
    p = subprocess.Popen([sys.executable, "-m", "layerdb.cli", "--db", str(db), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(100)
    p.stdout.close()  # well before the end: the output is some 200 KB
    err = p.stderr.read().decode()
    assert p.wait() == 0 and err == ""
