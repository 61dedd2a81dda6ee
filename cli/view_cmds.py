"""Commands that read a view: view, cat, export."""

from __future__ import annotations

import sys

import click

from . import render
from .base import at_option, cli, json_option, open_db, progress


@cli.command()
@at_option
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Type, mode, owner, size, mtime and the layer that last changed each entry.")
@click.option("-R", "recursive", is_flag=True,
              help="List subdirectories recursively, in tree order (a directory, then everything below it).")
@json_option
@click.pass_context
def view(ctx, ref, path, long, recursive, as_json):
    """List the file tree at REF (a directory's entries, or -R everything below).

    A directory's entries come sorted by name (raw bytes).  -R lists the whole
    subtree in tree order, as `export` writes it (GNU tar --sort=name: a
    directory, then its subtree, siblings by raw bytes), streamed: memory stays
    flat however many files the image holds.
    """
    db = open_db(ctx)
    rows = db.iter_listing(ref, path, recursive=recursive)
    if as_json:
        for r in rows:
            render.json_line(r)
        return
    out = sys.stdout
    for r in rows:
        name = r["path"] if recursive else r["path"].rsplit("/", 1)[-1] or "/"
        if r["type"] == "d" and not long:
            name += "/"
        if long:
            link = f" -> {r['link']}" if r["link"] is not None else ""
            size = r["rdev"] if "rdev" in r else (str(r["size"]) if r["size"] is not None else "-")
            out.write(f"{render.mode_string(r['type'], r['mode'])} {r['uid']:>5} {r['gid']:>5} {size:>10} "
                      f"{render.mtime(r['mtime'])} {render.short(r['layer_id'] or ''):12} {name}{link}\n")
        else:
            out.write(name + "\n")


@cli.command()
@at_option
@click.argument("path")
@click.pass_context
def cat(ctx, ref, path):
    """Write a file's bytes at REF to stdout."""
    db = open_db(ctx)
    out = sys.stdout.buffer
    for chunk in db.cat(ref, path):
        out.write(chunk)
    out.flush()


@cli.command()
@at_option
@click.option("-o", "--output", metavar="FILE", help="Write the tar here ('-' for stdout).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), help="Write the tree into this (new or empty) directory.")
@click.option("--allow-devices", is_flag=True, help="With --dir: create device files and fifos (refused by default).")
@click.pass_context
def export(ctx, ref, output, directory, allow_devices):
    """Export the whole view at REF as a tar, or into a directory."""
    from layerdb.engine.errors import UsageError

    if output and directory:
        raise UsageError("give either -o or --dir, not both")
    db = open_db(ctx)
    if directory:
        db.export_dir(ref, directory, allow_devices=allow_devices)
        return
    if not output:
        if sys.stdout.isatty():
            raise UsageError("refusing to write a tar to a terminal: use -o FILE or -o -")
        output = "-"
    update, stop = progress("export", unit="entries")
    prog = (lambda done, total: update("entries", done, total)) if update else None
    try:
        if output == "-":
            db.export_tar(ref, sys.stdout.buffer, prog)
            sys.stdout.buffer.flush()
        else:
            render.atomic_write(output, lambda f: db.export_tar(ref, f, prog))
    finally:
        stop()
