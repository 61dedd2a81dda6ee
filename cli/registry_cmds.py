"""Registry commands: pull, push, login, logout (skopeo's and podman's options)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import click

from . import render
from .base import cli, json_option, open_db


def _bool(value: str) -> bool:
    v = value.lower()
    # Go's strconv.ParseBool words (podman, skopeo), and yes/no.
    if v in ("true", "1", "t", "yes"):
        return True
    if v in ("false", "0", "f", "no"):
        return False
    raise click.BadParameter(f"{value!r}: expected true or false")


def _tri_state(ctx, param, value: str | None) -> bool | None:
    # None: not given, so registries.conf decides (podman's and skopeo's tri-state).
    return None if value is None else _bool(value)


TLS_VERIFY_HELP = ("true (or the bare flag): verify TLS, even for a registry registries.conf marks insecure; false: allow plain "
                   "HTTP and unverified TLS. Default: verify, except for registries.conf's insecure registries "
                   "and mirrors.")


def tls_verify_option(help: str = TLS_VERIFY_HELP) -> Callable:
    """--tls-verify=BOOL, None when not given (the engine's RegistryOptions.tls_verify)."""
    return click.option("--tls-verify", "tls_verify", metavar="BOOL", callback=_tri_state, help=help)


def registry_options(f: Callable) -> Callable:
    f = tls_verify_option()(f)
    f = click.option("--cert-dir", type=click.Path(file_okay=False), metavar="DIR",
                     help="*.crt files are trusted CAs; *.cert + *.key a client certificate.")(f)
    f = click.option("--authfile", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Credentials file (auth.json / config.json). Default: $REGISTRY_AUTH_FILE, else "
                          "$XDG_RUNTIME_DIR/containers/auth.json, else ~/.docker/config.json.")(f)
    f = click.option("--creds", metavar="USER[:PASSWORD]", help="Credentials for the registry.")(f)
    return f


def _opts(creds, authfile, tls_verify, cert_dir) -> dict[str, Any]:
    return {"creds": creds, "authfile": authfile, "tls_verify": tls_verify, "cert_dir": cert_dir}


class _Progress:
    """Per layer: bars on a terminal (rich), else one plain line when a layer starts and ends."""

    def __init__(self, verb: str, quiet: bool):
        self.verb = verb
        self.quiet = quiet
        self.bars = None
        self.tasks: dict[str, Any] = {}
        if not quiet and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

                self.bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                     console=Console(stderr=True))
                self.bars.start()
            except ImportError:
                self.bars = None

    def __call__(self, event: str, f: dict) -> None:
        if self.quiet:
            return
        d = render.short(f.get("digest"))
        if self.bars is not None:
            if event in ("start", "upload"):
                self.tasks[f["digest"]] = self.bars.add_task(f"{self.verb} {d}", total=f.get("size") or None)
            elif event == "bytes" and f["digest"] in self.tasks:
                self.bars.update(self.tasks[f["digest"]], completed=f["done"])
            elif event in ("done", "uploaded") and f["digest"] in self.tasks:
                self.bars.update(self.tasks[f["digest"]], completed=f.get("size") or 0,
                                 description=f"{self.verb} {d} done")
            elif event in ("skip", "exists", "mounted"):
                t = self.bars.add_task(f"{d} {self._skipword(event)}", total=f.get("size") or 1)
                self.bars.update(t, completed=f.get("size") or 1)
            return
        if event in ("start", "upload"):
            click.echo(f"{self.verb} blob {f['digest']} ({render.size(f.get('size'))})", err=True)
        elif event in ("done", "uploaded"):
            click.echo(f"done {f['digest']}", err=True)
        elif event in ("skip", "exists", "mounted"):
            click.echo(f"{self._skipword(event)} {f['digest']}", err=True)

    @staticmethod
    def _skipword(event: str) -> str:
        return {"skip": "stored already, not fetched:", "exists": "exists at the registry:",
                "mounted": "mounted:"}[event]

    def stop(self) -> None:
        if self.bars is not None:
            self.bars.stop()


@cli.command()
@click.argument("source", metavar="SOURCE")
@registry_options
@click.option("--platform", metavar="OS/ARCH[/VARIANT]", help="Image of a multi-platform index (default: this machine's).")
@click.option("--all-platforms", is_flag=True, help="Store every image of a multi-platform index.")
@click.option("--tag", "tags", multiple=True, metavar="NAME:TAG", help="Another name for the pulled image.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@json_option
@click.pass_context
def pull(ctx, source, creds, authfile, tls_verify, cert_dir, platform, all_platforms, tags, quiet, as_json):
    """Fetch an image from a registry; layers already stored are not downloaded."""
    opts = _opts(creds, authfile, tls_verify, cert_dir)
    db = open_db(ctx)
    prog = _Progress("fetching", quiet or as_json)
    try:
        res = db.pull(source, platform=platform, all_platforms=all_platforms, tags=list(tags), progress=prog, **opts)
    finally:
        prog.stop()
    for img in res.images:
        if as_json:
            render.json_line({"id": img["id"], "repo_tags": img["repo_tags"], "layers": img["layers"],
                              "manifest": img["manifest"], "platform": img["platform"], "new": img["new"],
                              "source": res.source, "reference": res.reference,
                              "layers_fetched": res.layers_fetched, "layers_skipped": res.layers_skipped,
                              "bytes_fetched": res.bytes_fetched})
        else:
            click.echo(img["id"])
    if not as_json and not quiet:
        click.echo(f"{res.layers_fetched} layers fetched ({render.size(res.bytes_fetched)}), "
                   f"{res.layers_skipped} stored already", err=True)


@cli.command()
@click.argument("image", metavar="IMAGE")
@click.argument("dest", metavar="[DEST]", required=False)
@registry_options
@click.option("--format", "fmt", type=click.Choice(["oci", "v2s2"]),
              help="Manifest format (default: the image's original one, else oci).")
@click.option("--preserve-digests", is_flag=True, help="Fail rather than change the manifest digest.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@json_option
@click.pass_context
def push(ctx, image, dest, creds, authfile, tls_verify, cert_dir, fmt, preserve_digests, quiet, as_json):
    """Upload an image to a registry; blobs the registry has are not uploaded."""
    opts = _opts(creds, authfile, tls_verify, cert_dir)
    db = open_db(ctx)
    prog = _Progress("uploading", quiet or as_json)
    try:
        res = db.push(image, dest, fmt=fmt, preserve_digests=preserve_digests, progress=prog, **opts)
    finally:
        prog.stop()
    if as_json:
        render.json_line({"destination": res.destination, "digest": res.digest, "previous": res.previous,
                          "kept": res.kept, "uploaded": res.uploaded, "mounted": res.mounted,
                          "existed": res.existed, "bytes_uploaded": res.bytes_uploaded, "images": res.images})
        return
    if res.previous:
        click.echo(f"manifest digest changed: {res.previous} -> {res.digest} "
                   "(layers were compressed again; signatures made for the old digest do not carry over)", err=True)
    click.echo(f"{res.destination}@{res.digest}")


@cli.command()
@click.argument("registry", required=False)
@click.option("-u", "--username", metavar="USER", help="User name (default: asked for).")
@click.option("-p", "--password", metavar="PASSWORD", help="Password (prefer --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--authfile", type=click.Path(dir_okay=False), metavar="FILE",
              help="Where to store it. Default: $REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json, "
                   "else ~/.docker/config.json.")
@click.option("--cert-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="*.crt files are trusted CAs; *.cert + *.key a client certificate.")
@tls_verify_option()
def login(registry, username, password, password_stdin, authfile, cert_dir, tls_verify):
    """Check credentials against a registry, then store them in the auth file.

    REGISTRY is HOST[:PORT], or HOST[:PORT]/NAMESPACE for that namespace's
    credentials only; without it, registries.conf's first unqualified-search registry."""
    from layerdb.engine.api import LayerDB
    from layerdb.engine.errors import UsageError

    if password_stdin and password:
        raise UsageError("--password and --password-stdin exclude each other")
    if not username:
        username = click.prompt("Username", err=True)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif password is None:
        password = click.prompt("Password", hide_input=True, err=True)
    if not password:
        raise UsageError("login: an empty password")
    where = LayerDB.login(registry, username, password, authfile=authfile, tls_verify=tls_verify,
                          cert_dir=cert_dir)
    click.echo("Login Succeeded!")
    click.echo(f"credentials stored in {where}", err=True)


@cli.command()
@click.argument("registry", required=False)
@click.option("--authfile", type=click.Path(dir_okay=False), metavar="FILE", help="The auth file to change.")
def logout(registry, authfile):
    """Remove a registry's (or a HOST/NAMESPACE's) credentials from the auth file."""
    from layerdb.engine.api import LayerDB

    LayerDB.logout(registry, authfile=authfile)
    click.echo(f"Removed login credentials for {registry or 'the default registry'}")
