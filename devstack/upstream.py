"""Run upstream's own tests, unmodified, against the drop-in ``pacifica.downloader``.

The suites are pacifica-downloader 0.4.1's ``tests/downloader_test.py`` and
pacifica-dispatcher 0.2.5's tests that use the downloader (``downloader_runners_test.py``,
``runners_test.py``), taken from their sdists. They run with ``.venv-upstream``'s Python
(scripts/install-upstream.sh: pacifica-dispatcher and its dependencies, and this project's
drop-in installed instead of upstream's ``pacifica-downloader``) against the real Archive
Interface and Cartd, and a Policy stand-in -- on the ports the tests hard-code: archive
127.0.0.1:8080, Cartd 127.0.0.1:8081, Policy 127.0.0.1:8181.

Those ports may be taken on the host, so this module is meant to run in a network namespace
of its own (tests/integration/test_upstream.py: ``unshare --net``, then ``ip link set lo up``). The
archive is preloaded as upstream's CI (``.travis.yml``) did: the repository's README.md stored
as files 103 and 104 (the dispatcher's README for its suite, the downloader's for its own),
transaction 67 listing them at ``a/b/foo.txt`` and ``a/b/é/baré.txt``, and the unmodified
``test_files/archiveinterfacepreload.py`` storing files 1100-1109.

    python -m devstack.upstream --workdir W --pacifica-venv V --upstream-venv U \
        --downloader-sdist D.tar.gz --dispatcher-sdist P.tar.gz --results DIR

Writes ``DIR/downloader.xml`` and ``DIR/dispatcher.xml`` (JUnit) and exits 0 when both suites
ran (whatever their outcome), non-zero when they could not be run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

from devstack.pacifica import PacificaStack
from devstack.policy import PolicyStandIn

ARCHIVE_PORT, CARTD_PORT, POLICY_PORT = 8080, 8081, 8181
SUITES = {
    "downloader": ["downloader_test.py"],
    "dispatcher": ["downloader_runners_test.py", "runners_test.py"],
}
SUITE_TIMEOUT = 300
# What the upstream tests must not read from our environment (0.4.1 reads CARTD_* itself).
_SCRUBBED_PREFIXES = ("CARTD_", "POLICY_", "PACIFICA_", "DOWNLOADER_", "AUTHENTICATION_", "PYTHON")


def unpack(sdist: Path, into: Path) -> Path:
    """Extract an sdist (data filter: nothing outside ``into``) and return its top directory."""
    with tarfile.open(sdist) as archive:
        archive.extractall(into, filter="data")
    return into / sdist.name.removesuffix(".tar.gz")


def transaction_67(readme: bytes) -> dict[str, object]:
    """Policy's document for transaction 67 as upstream's CI made it: README.md as files 103 and 104."""
    common = {"hashtype": "sha1", "hashsum": hashlib.sha1(readme).hexdigest(), "size": len(readme)}
    return {
        "_id": 67,
        "files": {
            "103": {"_id": 103, "name": "foo.txt", "subdir": "a/b", **common},
            "104": {"_id": 104, "name": "bar\u00e9.txt", "subdir": "a/b/\u00e9", **common},
        },
    }


def run_suite(python: Path, source: Path, tests: Sequence[str], junit: Path) -> int:
    """Run upstream's pytest as its CI did (from its ``tests`` directory); return pytest's code."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(_SCRUBBED_PREFIXES)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    argv = [str(python), "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}", *tests]
    done = subprocess.run(argv, cwd=source / "tests", env=env, timeout=SUITE_TIMEOUT, check=False)
    return done.returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Start the stack and the Policy stand-in, preload the archive, run both suites."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name in (
        "workdir",
        "pacifica-venv",
        "upstream-venv",
        "downloader-sdist",
        "dispatcher-sdist",
        "results",
    ):
        parser.add_argument(f"--{name}", type=Path, required=True)
    args = parser.parse_args(argv)
    python = args.upstream_venv.absolute() / "bin" / "python"  # not resolve(): that leaves the venv
    args.results.mkdir(parents=True, exist_ok=True)
    sources = args.workdir / "src"
    sources.mkdir(parents=True, exist_ok=True)
    downloader_src = unpack(args.downloader_sdist, sources)
    dispatcher_src = unpack(args.dispatcher_sdist, sources)
    codes = {}
    stack = PacificaStack(
        args.workdir / "stack", args.pacifica_venv, archive_port=ARCHIVE_PORT, cartd_port=CARTD_PORT
    )
    with stack, PolicyStandIn(port=POLICY_PORT) as policy:
        readme = (downloader_src / "README.md").read_bytes()
        stack.put_file(103, readme)
        stack.put_file(104, readme)
        policy.transactions["67"] = transaction_67(readme)
        subprocess.run(
            [str(python), "test_files/archiveinterfacepreload.py"], cwd=downloader_src, check=True, timeout=60
        )
        codes["downloader"] = run_suite(
            python, downloader_src, SUITES["downloader"], args.results / "downloader.xml"
        )
        # The dispatcher's test hashes its own README.md; as root the archive takes a new 103/104.
        readme = (dispatcher_src / "README.md").read_bytes()
        stack.put_file(103, readme)
        stack.put_file(104, readme)
        codes["dispatcher"] = run_suite(
            python, dispatcher_src, SUITES["dispatcher"], args.results / "dispatcher.xml"
        )
    print(f"upstream suites ran: {codes} (pytest exit codes)", file=sys.stderr)
    # 0 all passed, 1 some failed: both mean the suite ran; the caller reads the JUnit files.
    return 0 if all(code in (0, 1) for code in codes.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
