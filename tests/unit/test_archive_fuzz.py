"""A small, seeded fuzz of the tar reader: random and mutated Cartd-like tars.

Whatever the bytes, ``extract_cart`` must end in a :class:`DownloaderError` or a verified
tree under ``location/<filename>/``; nothing may change outside it, and a failure must leave
the location as it was (no staging directory, no half-written file). The run is bounded by a
count and by time; ``FUZZ_SEED``, ``FUZZ_CASES`` and ``FUZZ_SECONDS`` widen it by hand.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tarfile
import time
from collections import Counter
from pathlib import Path

from downloader_service import CartFile, DownloaderError
from downloader_service.archive import extract_cart
from tests.fakecartd import sha1

SEED = int(os.environ.get("FUZZ_SEED", "1729"))
CASES = int(os.environ.get("FUZZ_CASES", "300"))
SECONDS = float(os.environ.get("FUZZ_SECONDS", "3"))
NAMES = ["a", "b.txt", "résumé.csv", "データ", "x y", ".hidden", "a.~1~", "d" * 40]
TYPES = b"0125673LKxgSX\0"
Snapshot = dict[str, tuple[str, bytes]]


def cartd_tar(rng: random.Random) -> tuple[bytes, list[CartFile]]:
    """A tar as Cartd streams it (``w|``, pax, float mtimes: a pax header per member) and its files."""
    files: dict[str, bytes] = {}
    for _ in range(rng.randint(1, 4)):
        path = "/".join(rng.choice(NAMES) for _ in range(rng.randint(1, 3)))
        if not any(path.startswith(f"{other}/") or other.startswith(f"{path}/") for other in files):
            files[path] = rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randint(0, 3000)]))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()
        for path, data in files.items():
            parts = ["data", *path.split("/")]
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1.5e9 + rng.random()
                    tar.addfile(info)
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mtime = len(data), 1.5e9 + rng.random()
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), [CartFile(str(i), p, "sha1", sha1(d)) for i, (p, d) in enumerate(files.items())]


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    """One to three random edits: flipped bytes, header fields, cuts, splices, inserted blocks."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        blocks = max(1, len(buf) // 512)
        at = rng.randrange(blocks) * 512
        kind = rng.randrange(7)
        if kind == 0 and buf:  # flip a few bits anywhere
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # a size field: octal, base-256, huge, negative or junk
            field = rng.choice(
                [
                    b"%011o\0" % rng.randrange(1 << 33),
                    b"\x80" + rng.randbytes(11),
                    b"\xff" * 12,
                    rng.randbytes(12),
                ]
            )
            buf[at + 124 : at + 136] = field
        elif kind == 2:  # a type flag
            buf[at + 156 : at + 157] = bytes([rng.choice(TYPES)])
        elif kind == 3:  # cut the stream
            del buf[rng.randrange(len(buf) + 1) :]
        elif kind == 4:  # splice another tar in
            buf[at:] = other[rng.randrange(0, len(other) + 1, 512) :]
        elif kind == 5:  # insert a random or repeated block
            block = rng.randbytes(512) if rng.random() < 0.5 else bytes(buf[at : at + 512])
            buf[at:at] = block
        else:  # overwrite the name or pax record text
            text = rng.choice(
                [b"../x", b"/etc/passwd", b"data/../../x", b"99 path=data/zz\n", rng.randbytes(20)]
            )
            start = at + rng.randrange(512)
            buf[start : start + len(text)] = text
        if kind in (1, 2, 6) and rng.random() < 0.7:  # mostly a valid checksum, to get past it
            header = buf[at : at + 512]
            if len(header) == 512:
                header[148:156] = b" " * 8
                buf[at + 148 : at + 156] = b"%06o\0 " % sum(header)
    return bytes(buf)


def snapshot(root: Path) -> Snapshot:
    """Every entry under ``root``: its kind and, for files and links, content or target."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path).encode())
            elif path.is_dir():
                found[rel] = ("dir", b"")
            else:
                found[rel] = ("file", path.read_bytes())
    return found


def test_extract_cart_fuzzed_tars_end_in_our_errors_and_write_only_the_target(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    box = tmp_path / "box"  # what the extraction must not touch, around its location
    (box / "outside").mkdir(parents=True)
    (box / "outside/victim.txt").write_bytes(b"victim")
    location = box / "dest"
    outcomes: Counter[str] = Counter()
    deadline = time.monotonic() + SECONDS
    case = 0
    while case < CASES and time.monotonic() < deadline:
        data, files = cartd_tar(rng)
        other, _ = cartd_tar(rng)
        fuzzed = mutate(rng, data, other) if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 4096))
        location.mkdir(exist_ok=True)  # extract_cart makes it; it may stay, empty, on failure
        if rng.random() < 0.3:  # an earlier download to merge into
            (location / "data/a").mkdir(parents=True, exist_ok=True)
            (location / "data/a/b.txt").write_bytes(b"precious")
        before = snapshot(box)
        context = f"FUZZ_SEED={SEED} case {case}: {fuzzed[:64]!r}..."
        try:
            result = extract_cart(io.BytesIO(fuzzed), location, "data", files if rng.random() < 0.8 else None)
        except DownloaderError as exc:
            outcomes[type(exc).__name__] += 1
            assert snapshot(box) == before, context
        else:
            outcomes["ok"] += 1
            after = snapshot(box)
            changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
            assert all(f"{path}/".startswith("dest/data/") for path in changed), (context, changed)
            assert all(kind != "link" for kind, _ in after.values()), context
            assert sorted(os.listdir(location)) == ["data"], context  # no staging directory left
            kept = Counter(content for kind, content in after.values() if kind == "file")
            assert all(kept[content] for kind, content in before.values() if kind == "file"), context
            assert all(path.is_file() for path in result.files), context
        shutil.rmtree(location, ignore_errors=True)
        case += 1
    assert case >= min(CASES, 50), f"only {case} cases ran in {SECONDS} s"
    assert outcomes["ok"] and len(outcomes) > 3, outcomes  # the mutations reach past the first header
