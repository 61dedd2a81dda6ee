#!/usr/bin/env python3
"""Run every benchmark (issue 5's seven targets, issue 3's log/find, issue 13's pull and
issue 14's build) and print a summary.

    sudo python3 bench/images.py                       # once: build the images (root)
    LAYERDB=/path/to/layerdb python3 bench/run_all.py  # then: all targets, about 25 min
    python3 bench/run_all.py --only import,memory --runs 5 --json > results.jsonl
    python3 bench/run_all.py --markdown                # the README's results table
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_build  # noqa: E402
import bench_export  # noqa: E402
import bench_import  # noqa: E402
import bench_log_find  # noqa: E402
import bench_lookup_depth  # noqa: E402
import bench_memory  # noqa: E402
import bench_pull  # noqa: E402
import bench_startup  # noqa: E402
import bench_gunzip  # noqa: E402
import bench_store_size  # noqa: E402
import bench_subfile_dedup  # noqa: E402
from common import Result, capture, code_fingerprint, fmt, layerdb_cmd, log, machine, parser, report  # noqa: E402

BENCHES = {
    "import": bench_import.run_bench,
    "store_size": bench_store_size.run_bench,
    "subfile_dedup": bench_subfile_dedup.run_bench,
    "lookup_depth": bench_lookup_depth.run_bench,
    "log_find": bench_log_find.run_bench,
    "startup": bench_startup.run_bench,
    "gunzip": bench_gunzip.run_bench,
    "memory": bench_memory.run_bench,
    "export": bench_export.run_bench,
    "pull": bench_pull.run_bench,
    "build": bench_build.run_bench,
}


def markdown(results: list[Result]) -> str:
    lines = ["| target | layerdb | peer | ratio | limit | |", "|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "n/a"
        lim = f"<= {r.limit:g}x" if r.limit is not None else "figure"
        peer = f"{r.peer_name} {fmt(r.peer, r.unit)}"
        cells = [r.target, fmt(r.layerdb, r.unit), peer, ratio, lim, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
MARK = "<!-- results:"


def results_section(head: dict, warning: str | None, results: list[Result], runs: int) -> str:
    lines = [f"Run of {head['date']} on {head['nproc']} cores ({head['cpu']}), {head['ram_gib']} GiB RAM, "
             f"Linux {head['kernel']}, Python {head['python']}; {head['layerdb']}, code {head['code']} "
             f"(git HEAD + hash of engine/ and cli/ on disk); {runs} rounds or more, medians.", ""]
    if warning:
        lines += [f"Warning: {warning}.", ""]
    return "\n".join(lines) + "\n" + markdown(results) + "\n"


def write_readme(section: str) -> None:
    """Replace everything after the results marker in bench/README.md."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    i = text.index(MARK)
    j = text.index("\n", i) + 1
    with open(README, "w", encoding="utf-8") as f:
        f.write(text[:j] + "\n" + section)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--only", help="comma-separated: " + ",".join(BENCHES))
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table for the README")
    p.add_argument("--readme", action="store_true", help="write the results into bench/README.md")
    a = p.parse_args()
    names = a.only.split(",") if a.only else list(BENCHES)
    unknown = set(names) - set(BENCHES)
    if unknown:
        p.error(f"unknown bench: {', '.join(sorted(unknown))}")
    if a.readme and a.only:
        p.error("--readme writes the whole results table: run every bench (no --only)")
    m = machine()
    try:
        version = capture(layerdb_cmd() + ["--version"]).strip()
    except Exception:  # an old layerdb without --version still gets benchmarked
        version = "?"
    code = code_fingerprint()
    head = {"date": _dt.date.today().isoformat(), "layerdb": version, "code": code,
            "command": " ".join(layerdb_cmd()), **m}
    if a.json:
        print(json.dumps({"machine": head}))
    else:
        print(f"# {head['date']}  {version}  code {code}  nproc={m['nproc']}  {m['cpu']}  RAM {m['ram_gib']} GiB")
    results: list[Result] = []
    failed = []
    for n in names:
        log(f"=== {n}")
        try:
            rs = BENCHES[n](a.runs)
        except Exception:
            # One crashing bench (a layerdb bug on a big image, say) must not hide the others.
            failed.append(n)
            traceback.print_exc()
            rs = [Result(n, f"{n}: the bench failed (see the traceback on stderr)", None, "", None, None, failed=True)]
        report(rs, a.json)
        results.extend(rs)
    msg = None
    # Only the sources count: a commit of docs during the run moves HEAD, not the code measured.
    if code_fingerprint().partition("+")[2] != code.partition("+")[2]:
        msg = f"the engine or CLI sources changed during the run (was {code}, now {code_fingerprint()})"
        log("warning: " + msg)
        if a.json:
            print(json.dumps({"warning": msg}))
        else:
            print(f"# warning: {msg}")
    if not a.json:
        print("\n# summary")
        for r in results:
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "n/a"
            print(f"[{r.verdict:4}] {ratio:>8}  {r.target}")
    if a.markdown:
        print()
        print(markdown(results))
    if a.readme:
        write_readme(results_section(head, msg, results, a.runs))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
