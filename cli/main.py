"""The layerdb command line: parse, call the engine, render a table or JSON.

cli/base.py holds the group and the shared options; each *_cmds module
registers one group of commands on it when the group first needs one of them
(base.COMMAND_MODULES).
"""

from __future__ import annotations

import gc
from typing import Iterable

from .base import cli

__all__ = ["cli", "main"]


def main(argv: Iterable[str] | None = None) -> None:
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="layerdb")
    except SystemExit:
        # The interpreter is about to exit, and its shutdown would run the
        # cyclic collector over every object the command left alive: from
        # main's return to the process's end took 14 ms for `history` and
        # 36 ms for an import, 4-5 and 8 ms frozen.  Frozen objects are freed
        # by reference counting alone as modules are cleared; atexit handlers
        # and finalizers still run.
        gc.freeze()
        raise


if __name__ == "__main__":
    main()
