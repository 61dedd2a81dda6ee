"""Audit commands: log, diff, find, waste (and the rendering of history --changes)."""

from __future__ import annotations

import re
import sys
from typing import Iterable

import click

from . import render
from .base import cli, json_option, open_db

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")


def parse_size(text: str) -> int:
    """Bytes from '1048576', '20MB' (powers of 1000) or '20MiB' (powers of 1024), as dive takes them."""
    from layerdb.engine.errors import UsageError

    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"not a size: {text!r} (examples: 1048576, 20MB, 20MiB)")
    base = 1024 if m.group(3) else 1000
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * base**power)


def change_line(r: dict) -> str:
    """One A/C/D line like `docker diff`, with what changed for a C."""
    line = f"{r['change']} {r['path']}"
    if r["change"] == "C":
        line += f"  ({r['what']}: {', '.join(r['fields'])})"
    return line


def json_rows(rows) -> None:
    for r in rows:
        render.json_line(r)


def write_text(text: str) -> None:
    # Paths and file contents may hold surrogate escapes: write their original bytes.
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))


@cli.command("diff")
@click.argument("ref1")
@click.argument("ref2")
@json_option
@click.option("--stat", is_flag=True, help="Only a summary: counts per change kind and the bytes added and removed.")
@click.pass_context
def diff_cmd(ctx, ref1, ref2, as_json, stat):
    """What changed from the view at REF1 to the view at REF2: A/C/D per path.

    Content is compared by sha256; C lines say whether the content, only the
    metadata (mode, owner, mtime, link target, xattrs) or the type changed.
    Any two views compare, also of unrelated images.  Paths come in tree
    order (a directory, then everything below it; siblings by raw bytes),
    streamed: memory stays flat however many files the images hold.
    """

    rows = (db := open_db(ctx)).diff(ref1, ref2)
    if stat:
        s = db.diff_stat(rows)
        if as_json:
            render.json_line(s)
        else:
            click.echo(f"{s['added']} added, {s['changed']} changed ({s['content']} content, {s['metadata']} metadata, "
                       f"{s['type']} type), {s['deleted']} deleted; file bytes +{render.size(s['bytes_added'])} "
                       f"-{render.size(s['bytes_removed'])}")
        return
    if as_json:
        return json_rows(rows)
    for r in rows:
        write_text(change_line(r) + "\n")


@cli.command()
@click.option("--name", metavar="GLOB", help="File name (last component), e.g. 'libssl.so*'. * ? [...] [!...].")
@click.option("--path", metavar="GLOB", help="Absolute path, e.g. '/usr/lib/*'; * also matches /.")
@click.option("--sha256", metavar="HEX", help="Content digest (at least 8 hex digits, a prefix is enough).")
@click.option("--visible", is_flag=True, help="Only files still present, with this content, in the image's top view.")
@json_option
@click.pass_context
def find(ctx, name, path, sha256, visible, as_json):
    """Which images and layers hold matching files, searched through the indexes.

    Without --visible the list includes files deleted or overwritten later: their
    bytes still ship in the image.
    """

    rows = open_db(ctx).find(name=name, path=path, sha256=sha256, visible_only=visible)
    if as_json:
        return json_rows(rows)
    table = []
    for r in rows:
        image = (r["repo_tags"] or [render.short(r["image"]) or "<no image>"])[0]
        table.append([image, str(r["position"]), render.short(r["layer_id"]), r["path"], r["type"],
                      "" if r["size"] is None else str(r["size"]), (r["sha256"] or "")[:12],
                      "yes" if r["visible"] else "no", render.trunc(r["created_by"] or "", 40)])
    render.table(["IMAGE", "POS", "LAYER", "PATH", "TYPE", "SIZE", "SHA256", "VISIBLE", "CREATED BY"], table)


@cli.command()
@click.argument("image")
@json_option
@click.option("--ci", is_flag=True, help="Exit with code 1 when a threshold fails (like dive --ci).")
@click.option("--lowest-efficiency", type=float, default=None, metavar="F",
              help="With --ci: the lowest acceptable efficiency, 0..1 (default 0.9, as dive).")
@click.option("--highest-wasted-bytes", metavar="SIZE", help="With --ci: the most wasted bytes allowed (e.g. 20MB).")
@click.option("--highest-user-wasted-percent", type=float, default=None, metavar="F",
              help="With --ci: the most wasted bytes allowed as a fraction of the user bytes, 0..1 "
                   "(default 0.1, as dive).")
@click.option("--limit", type=int, default=20, show_default=True, help="Wasted files listed in the table (0: all).")
@click.pass_context
def waste(ctx, image, as_json, ci, lowest_efficiency, highest_wasted_bytes, highest_user_wasted_percent, limit):
    """dive's efficiency score and wasted bytes, and which layer wasted each file.

    \b
    The score, wasted bytes and user wasted percent are dive's own figures,
    computed as dive computes them (from the event log, no tar read): a path
    some layer names twice or more wastes all its bytes; user bytes are the
    file bytes of every layer but the first; --ci applies dive's rules to them.
    Below them, layerdb's own account: file contents a layer ships that the
    top view does not show, overwritten or deleted by a later layer (which is
    named), per layer and per file (in --json: `own`, `layers`, `files`).
    """
    from layerdb.engine.errors import UsageError, WasteCheckFailed

    if not ci and (lowest_efficiency is not None or highest_wasted_bytes is not None
                   or highest_user_wasted_percent is not None):
        raise UsageError("--lowest-efficiency, --highest-wasted-bytes and --highest-user-wasted-percent need --ci")
    highest = parse_size(highest_wasted_bytes) if highest_wasted_bytes is not None else None
    lowest = lowest_efficiency if lowest_efficiency is not None else 0.9
    user_share = highest_user_wasted_percent if highest_user_wasted_percent is not None else 0.1
    db = open_db(ctx)
    report = db.waste(image)
    failures = db.waste_failures(report, lowest, highest, user_share) if ci else []
    if as_json:
        render.json_line(report)
    else:
        _waste_table(report, limit)
    if failures:
        raise WasteCheckFailed("waste check failed: " + "; ".join(failures))


def _waste_table(report: dict, limit: int) -> None:
    name = (report["repo_tags"] or [render.short(report["image"] or "")])[0]
    click.echo(f"Image: {name}")
    click.echo(f"Efficiency: {report['efficiency'] * 100:.4f} %")
    click.echo(f"Wasted: {render.size(report['wasted_bytes'])} of {render.size(report['size_bytes'])} file bytes")
    share = report["user_wasted_percent"]
    click.echo(f"User wasted: {'-' if share is None else f'{share * 100:.4f} %'} of "
               f"the {render.size(report['user_bytes'])} of every layer but the first")
    own = report["own"]
    click.echo(f"Not in the top view: {render.size(own['wasted_bytes'])} shipped by a layer and overwritten or"
               f" deleted later (layerdb's efficiency {own['efficiency'] * 100:.4f} %)")
    click.echo("")
    render.table(["POS", "LAYER", "SIZE", "WASTED", "CREATED BY"], [
        [str(li["position"]), render.short(li["layer_id"]), render.size(li["size"]), render.size(li["wasted_bytes"]),
         render.trunc(li["created_by"] or "", 60)] for li in report["layers"]])
    files = report["files"] if limit <= 0 else report["files"][:limit]
    if files:
        click.echo("")
        render.table(["SIZE", "PATH", "ADDED", "HOW", "BY"], [
            [render.size(f["size"]), f["path"], f"{f['position']} {render.short(f['layer_id'])}", f["how"] or "",
             f"{f['wasted_by']} {render.short(f['wasted_by_layer_id'] or '')}"] for f in files])
        if len(files) < len(report["files"]):
            click.echo(f"... and {len(report['files']) - len(files)} more (--limit 0 lists all)")


# Rendering for `log` and `history --changes` (commands in main.py) -------------------

def _op(r: dict) -> str:
    return r["op"] + (f" ({r['via']})" if r["via"] else "")


def render_log(rows: list[dict], all_images: bool) -> None:
    headers = ["#", "POS", "LAYER", "OP", "TYPE", "MODE", "OWNER", "SIZE", "SHA256", "CREATED BY"]
    if all_images:
        headers = ["IMAGE"] + headers + ["SHARED WITH"]
    table = []
    for r in rows:
        size = "" if r["size"] is None else str(r["size"])
        owner = "" if r["uid"] is None else f"{r['uid']}:{r['gid']}"
        row = [str(r["version"]), str(r["position"]), render.short(r["layer_id"] or ""), _op(r), r["type"] or "",
               r["mode"] or "", owner, size, (r["sha256"] or "")[:12], render.trunc(r["created_by"] or "", 50)]
        if all_images:
            row = [r["image"]] + row + [render.trunc(", ".join(r["shared_with"]), 40)]
        table.append(row)
    render.table(headers, table)


def render_patches(rows: list[dict]) -> None:
    """Like `git log -p`: a header per version, its history step, then the patch."""
    for r in rows:
        what = " ".join(x for x in (r["type"], r["mode"], None if r["uid"] is None else f"{r['uid']}:{r['gid']}",
                                    None if r["size"] is None else f"{r['size']} bytes",
                                    r["sha256"] and "sha256:" + r["sha256"]) if x)
        write_text(f"version {r['version']} of {r['image']}: layer {render.short(r['layer_id'] or '')} "
                   f"(position {r['position']}) {_op(r)}{'  ' + what if what else ''}\n\n"
                   f"    {render.trunc(r['created_by'] or '', 200)}\n\n{r['patch']}")
        write_text("\n")


def render_changes(rows: Iterable[dict], as_json: bool, no_trunc: bool) -> None:
    if as_json:
        return json_rows(rows)
    last = None
    for r in rows:
        if r["position"] != last:
            cb = r["created_by"] or ""
            write_text(f"{'' if last is None else chr(10)}{render.short(r['layer_id'])}  position {r['position']}  "
                       f"{cb if no_trunc else render.trunc(cb, 60)}\n")
            last = r["position"]
        write_text("  " + change_line(r) + "\n")


@cli.command()
@click.argument("path")
@click.option("--image", metavar="IMAGE", help="The image whose chain to audit (default: the only image).")
@click.option("--all", "all_images", is_flag=True, help="Every stored image whose layers hold or touched PATH.")
@click.option("-p", "--patch", is_flag=True, help="A unified diff of the contents between consecutive versions.")
@click.option("--at-version", type=int, metavar="N", help="Write version N's contents (N as in the # column) to stdout.")
@json_option
@click.pass_context
def log(ctx, path, image, all_images, patch, at_version, as_json):
    """Every change to PATH along an image's chain, oldest first."""
    db = open_db(ctx)
    if at_version is not None:
        from layerdb.engine.errors import UsageError

        if all_images or patch or as_json:
            raise UsageError("--at-version goes with --image only")
        for chunk in db.version_contents(path, at_version, image):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    rows = db.log(path, image=image, all_images=all_images, patch=patch)
    if as_json:
        json_rows(rows)
    elif patch:
        render_patches(rows)
    else:
        render_log(rows, all_images)
