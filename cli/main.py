"""The layerdb command line: parse, call the engine, render a table or JSON.

Engine modules are imported inside the commands so that `layerdb --help` and
small commands start fast.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable

import click

from . import render


class LayerdbGroup(click.Group):
    """Turns engine errors into one line on stderr and their exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        # Usage errors too are one line (click would print the usage block).
        standalone = kwargs.pop("standalone_mode", True)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            if not standalone:
                raise
            click.echo(f"layerdb: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            if not standalone:
                raise
            click.echo("layerdb: aborted", err=True)
            sys.exit(1)
        # Without standalone mode click returns ctx.exit()'s code instead of exiting.
        if standalone:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv

    def invoke(self, ctx: click.Context) -> Any:
        from layerdb.engine.errors import LayerdbError

        try:
            return super().invoke(ctx)
        except LayerdbError as e:
            click.echo(f"layerdb: error: {' '.join(e.message.split())}", err=True)
            ctx.exit(e.exit_code)
        except BrokenPipeError:
            # `layerdb cat ... | head`: the reader left; that is not an error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(0)


def _configure_logging(fmt: str, verbose: int) -> None:
    from layerdb.engine import log

    level = log.WARNING - 10 * min(verbose, 2)

    def setup() -> None:  # runs on the first log event that passes the level
        import structlog

        renderer: Any
        if fmt == "json":
            renderer = structlog.processors.JSONRenderer()
        else:
            renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=False,
        )

    log.configure(level, setup)


@click.group(cls=LayerdbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "db", type=click.Path(dir_okay=False), envvar="LAYERDB_DB",
              help="Store file. Default: $LAYERDB_DB, else $XDG_DATA_HOME/layerdb/layerdb.sqlite.")
@click.option("--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True,
              help="Format of log lines on stderr.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="layerdb", prog_name="layerdb")
@click.pass_context
def cli(ctx: click.Context, db: str | None, log_format: str, verbose: int) -> None:
    """layerdb: an event-sourced store for container images.

    Import `docker save` and OCI archives, then browse any layer's file tree,
    audit a path's history across layers, and export views.
    """
    _configure_logging(log_format, verbose)
    # Paths are bytes; names that are not UTF-8 go out as the bytes they are (like ls).
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    ctx.obj = {"db": db}


def open_db(ctx: click.Context):
    from layerdb.engine.api import LayerDB

    db = LayerDB(ctx.obj["db"])
    ctx.call_on_close(db.close)
    return db


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
at_option = click.option("--at", "ref", required=True, metavar="REF",
                         help="NAME[:TAG], image id, or layer id (prefix), optionally ~N layers down.")


def _progress(label: str, unit: str = "bytes") -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
    """A progress bar on stderr when it is a terminal (rich, imported only then)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    try:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn
    except ImportError:
        return None, lambda: None
    count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
    p = Progress(TextColumn("{task.description}"), BarColumn(), count, transient=True, console=Console(stderr=True))
    p.start()
    task = p.add_task(label, total=None)

    def update(kind: str, done: int, total: int) -> None:
        p.update(task, description=f"{label} {kind}", completed=done, total=total or None)

    return update, p.stop


# Commands ------------------------------------------------------------------------


@cli.command("import")
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--tag", metavar="NAME:TAG", help="Tag the imported image (archives with one image).")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="Which image of a multi-platform index to import (default: this machine's).")
@json_option
@click.pass_context
def import_cmd(ctx, archive, tag, platform, as_json):
    """Import every image in a docker-save or OCI archive."""
    db = open_db(ctx)
    update, stop = _progress("import")
    try:
        res = db.import_archive(archive, tag=tag, platform=platform, progress=update)
    finally:
        stop()
    for img in res.images:
        if as_json:
            render.json_line({"id": img["id"], "repo_tags": img["repo_tags"], "layers": img["layers"],
                              "new": img["new"]})
        elif img["repo_tags"]:
            for t in img["repo_tags"]:
                click.echo(f"Loaded image: {t}")
        else:
            click.echo(f"Loaded image ID: {img['id']}")


@cli.command()
@json_option
@click.option("--no-trunc", is_flag=True, help="Show full image ids.")
@click.pass_context
def images(ctx, as_json, no_trunc):
    """List images: name:tag, id, layers, size, created."""
    db = open_db(ctx)
    rows = db.images()
    if as_json:
        for r in rows:
            render.json_line(r)
        return
    table = []
    for r in rows:
        iid = r["id"] if no_trunc else render.short(r["id"])
        for t in r["repo_tags"] or ["<none>:<none>"]:
            repo, _, tg = t.rpartition(":")
            table.append([repo, tg, iid, str(r["layers"]), render.ago(r["created"]), render.size(r["size"])])
    render.table(["REPOSITORY", "TAG", "IMAGE ID", "LAYERS", "CREATED", "SIZE"], table)


@cli.command()
@click.argument("image")
@json_option
@click.option("--no-trunc", is_flag=True, help="Do not truncate created_by.")
@click.option("--changes", is_flag=True, help="Each layer's change set instead: A/C/D per path against the layer below.")
@click.pass_context
def history(ctx, image, as_json, no_trunc, changes):
    """One row per history entry, newest first (like `docker history`)."""
    db = open_db(ctx)
    if changes:
        from . import audit as audit_cli
        from layerdb.engine import audit

        audit_cli.render_changes(audit.iter_changes(db, image), as_json, no_trunc)
        return
    rows = db.history(image)
    if as_json:
        for r in rows:
            render.json_line(r)
        return
    table = []
    for r in rows:
        lid = render.short(r["layer_id"]) if r["layer_id"] else "<missing>"
        cb = r["created_by"] or ""
        if not no_trunc:
            cb = render.trunc(cb, 60)
        table.append([lid, render.ago(r["created"]), cb, render.size(r["size"]), r["comment"] or ""])
    render.table(["LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"], table)


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
    update, stop = _progress("export", unit="entries")
    prog = (lambda done, total: update("entries", done, total)) if update else None
    try:
        if output == "-":
            db.export_tar(ref, sys.stdout.buffer, prog)
            sys.stdout.buffer.flush()
        else:
            render.atomic_write(output, lambda f: db.export_tar(ref, f, prog))
    finally:
        stop()


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
    from . import audit as audit_cli

    db = open_db(ctx)
    if at_version is not None:
        from layerdb.engine import audit
        from layerdb.engine.errors import UsageError

        if all_images or patch or as_json:
            raise UsageError("--at-version goes with --image only")
        for chunk in audit.version_contents(db, path, at_version, image):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    rows = db.log(path, image=image, all_images=all_images, patch=patch)
    if as_json:
        audit_cli.json_rows(rows)
    elif patch:
        audit_cli.render_patches(rows)
    else:
        audit_cli.render_log(rows, all_images)


def main(argv: Iterable[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="layerdb")


from . import store_cmds as _store_cmds  # noqa: E402,F401  registers save, fsck, stats
from . import maint_cmds as _maint_cmds  # noqa: E402,F401  registers rm, gc
from . import audit as _audit  # noqa: E402,F401  registers diff, find, waste
from . import container_cmds as _container_cmds  # noqa: E402,F401  registers container, cp, commit, mount, umount

if __name__ == "__main__":
    main()
