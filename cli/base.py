"""What every command module shares: the `layerdb` group, its error handling, the
shared options, opening the store, and progress bars.

Engine modules are imported inside the commands so that `layerdb --help` and
small commands start fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable

import click

# Commands that stream whole layers through several threads (a read-ahead, the
# zstd worker, export's decoders, pull's downloads).
STREAMING = frozenset({"import", "pull", "push", "build", "export", "save", "commit", "cp", "container", "mount",
                       "explore", "fsck", "gc"})
M_ARENA_MAX = -8  # glibc's mallopt parameter


def one_heap() -> None:
    """Let every thread allocate from one glibc heap.

    By default each thread that allocates while another holds the heap's lock
    gets an arena of its own, and a freed buffer of 1 to 8 MiB stays resident
    in the arena of the thread that freed it: the next one, on another
    thread, comes from another arena.  With one arena the same memory serves
    them all.  On Debian+python3 (12-02, 2 cores, medians of 6 to 8 runs):
    import peaked at 77-88 MiB instead of 80-89, export at 72-77 instead of
    86-91, and a pull at 87-94 MiB instead of 104-110 with the default
    policy, at no cost in time: the threads hold the GIL when they allocate,
    so they never wait for the lock.  pull used a fixed 2 MiB mmap threshold
    instead, which cost 0.35 s of page faults (system time 0.91 against 0.54
    s).  Process-wide, so the program sets it, not the library.
    """
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        pass


# The module that registers each command.  A command's module is imported when
# the command runs (or `--help` lists it), so a command pays for its own module
# only: all of them cost 30-40 ms of every start.
COMMAND_MODULES = {
    "import": "image_cmds", "images": "image_cmds", "history": "image_cmds",
    "view": "view_cmds", "cat": "view_cmds", "export": "view_cmds",
    "diff": "audit_cmds", "find": "audit_cmds", "waste": "audit_cmds", "log": "audit_cmds",
    "save": "store_cmds", "fsck": "store_cmds", "stats": "store_cmds",
    "rm": "maint_cmds", "gc": "maint_cmds",
    "container": "container_cmds", "cp": "container_cmds", "commit": "container_cmds", "mount": "container_cmds",
    "umount": "container_cmds",
    "pull": "registry_cmds", "push": "registry_cmds", "login": "registry_cmds", "logout": "registry_cmds",
    "build": "build_cmds", "explore": "explore_cmds",
}


# Options that podman and skopeo declare as Go booleans: `--tls-verify` alone means
# true and never takes the next word, which may be the image reference.
BARE_BOOL_FLAGS = frozenset({"--tls-verify"})
BOOL_WORDS = frozenset({"true", "false", "1", "0", "t", "f", "yes", "no"})


def bare_bool_flags(args: list[str]) -> list[str]:
    """`--tls-verify` with no value of its own becomes `--tls-verify=true`.

    A boolean word after it is still its value (`--tls-verify false`, which
    click users write); anything else, a reference or another option, is left
    where it is.  Arguments after `--` are not options.
    """
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if arg in BARE_BOOL_FLAGS and (nxt is None or nxt.lower() not in BOOL_WORDS):
            arg += "=true"
        out.append(arg)
    return out


class LayerdbGroup(click.Group):
    """Turns engine errors into one line on stderr and their exit code, and
    loads each command's module when it is first wanted."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMAND_MODULES:
            importlib.import_module(f"{__package__}.{COMMAND_MODULES[name]}")
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        return name, cmd, bare_bool_flags(rest)

    def load_all(self) -> dict[str, click.Command]:
        """Every command, its module imported."""
        for module in sorted(set(COMMAND_MODULES.values())):
            importlib.import_module(f"{__package__}.{module}")
        return self.commands

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

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # A bare `layerdb` is a request for help, as with podman and docker: not an error.
        if not args:
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        from layerdb.engine.errors import LayerdbError

        try:
            return super().invoke(ctx)
        except LayerdbError as e:
            click.echo(f"layerdb: error: {' '.join(e.message.split())}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            # Ctrl-C: 128 + SIGINT, as shells, docker and podman exit.  The engine has
            # rolled back whatever it was writing by the time this arrives here.
            click.echo("layerdb: aborted", err=True)
            ctx.exit(130)
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
    if ctx.invoked_subcommand in STREAMING:
        one_heap()


def open_db(ctx: click.Context):
    from layerdb.engine.api import LayerDB

    db = LayerDB(ctx.obj["db"])
    ctx.call_on_close(db.close)
    return db


json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
at_option = click.option("--at", "ref", required=True, metavar="REF",
                         help="NAME[:TAG], image id, or layer id (prefix), optionally ~N layers down.")


def progress(label: str, unit: str = "bytes") -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
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
