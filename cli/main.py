"""The layerdb command line: parse, call the engine, render a table or JSON.

cli/base.py holds the group and the shared options; each *_cmds module
registers one group of commands on it when the group first needs one of them
(base.COMMAND_MODULES).
"""

from __future__ import annotations

from typing import Iterable

from .base import cli

__all__ = ["cli", "main"]


def main(argv: Iterable[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="layerdb")


if __name__ == "__main__":
    main()
