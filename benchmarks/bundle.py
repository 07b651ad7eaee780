"""Where a bundled cart starts to pay: ours bundled vs plain by cart size, on the real Cartd.

Run from the repository root::

    .venv/bin/python benchmarks/bundle.py [--sweep 4,16,64,256] [--files 10] [--runs 3] [--out FILE]

A sweep around the library's ``DEFAULT_BUNDLE_THRESHOLD`` (64 MiB): one file of each size
(MiB), then 500 MiB in ``--files`` files, each downloaded by ours with ``bundle=True`` and
``bundle=False``, interleaved, each run a cart of its own, in a fresh child process — the
harness of ``benchmarks/run.py``, which this imports. ``run.py`` itself measures the 500 MB
comparison against its target and the resume after a cut; this is the wider sweep.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import run

MB = run.MB


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", default="4,16,64,256", help="one-file sizes in MiB ('' to skip)")
    parser.add_argument("--files", type=int, default=10, help="500 MiB in this many files (0 to skip)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode per size")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    workloads = [
        run.Workload(f"{mib}MiB", (mib * MB,), runs=args.runs, tools=("ours", "bundle"))
        for mib in (int(size) for size in args.sweep.split(",") if size)
    ]
    if args.files:
        sizes = (500 * MB // args.files,) * args.files
        workloads.append(
            run.Workload(f"{args.files}x{500 // args.files}MiB", sizes, args.runs, tools=("ours", "bundle"))
        )
    began = time.monotonic()
    with run.session(upstream=False) as bench:
        results = [bench.workload(workload, args.runs) for workload in workloads]
    table = "\n".join(run.render_bundles(results)).strip() + "\n"
    table += f"\nWhole run: {time.monotonic() - began:.0f} s.\n"
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
