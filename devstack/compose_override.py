"""Write the Compose override that swaps only ``image:`` of docker-compose.yml's services.

``scripts/compose-images`` builds local stand-ins for the images the compose file names (no
registry is reachable here) and calls this module to write the override::

    python3 -m devstack.compose_override docker-compose.yml OUT OWN_IMAGE NAME=LOCAL...

Every service gets exactly one ``image:``: the stand-in for the image it names, or
``OWN_IMAGE`` (this tree's Dockerfile, built as scripts/test-container builds it) when it
``build:``s. A service whose image has no stand-in is an error, so the map in
compose-images and the compose file change together. Standard library only: it runs with
the system Python, before any virtualenv exists. ``tests/system/test_deployment.py`` checks with
the real Compose parser that the merged file differs from docker-compose.yml only in
``image:``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HEADER = [
    "# Written by scripts/compose-images: only `image:` of each service, swapped for a local",
    "# build (no registry is reachable here). Use: -f docker-compose.yml -f <this file>.",
]


class MissingStandIn(ValueError):
    """A service names an image no local build stands in for."""


def services(compose_text: str) -> dict[str, dict[str, str]]:
    """Each service's ``image`` and ``build`` (as written: two-space block YAML)."""
    found: dict[str, dict[str, str]] = {}
    current = None
    inside = False
    for line in compose_text.splitlines():
        if re.match(r"^services:\s*$", line):
            inside = True
            continue
        if inside and re.match(r"^[^\s#]", line):
            inside = False
        if not inside:
            continue
        if match := re.match(r"^  ([A-Za-z0-9_.-]+):\s*$", line):
            current = match.group(1)
            found[current] = {}
        elif current and (match := re.match(r"^    (image|build):\s*(\S.*?)\s*$", line)):
            found[current][match.group(1)] = match.group(2)
    return found


def override(compose_text: str, stand_in: Mapping[str, str], own_image: str) -> str:
    """The override file's text; MissingStandIn names every service that has none."""
    lines = [*HEADER, "services:"]
    missing = []
    for name, spec in services(compose_text).items():
        if "build" in spec:
            image = own_image
        elif spec.get("image") in stand_in:
            image = stand_in[spec["image"]]
        else:
            missing.append(f"{name} ({spec.get('image')})")
            continue
        lines += [f"  {name}:", f"    image: {json.dumps(image)}"]
    if missing:
        raise MissingStandIn("no local stand-in for: " + ", ".join(missing))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    """``COMPOSE OUT OWN_IMAGE NAME=LOCAL...``: write OUT atomically."""
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    compose, out, own_image, *pairs = argv
    stand_in = dict(pair.split("=", 1) for pair in pairs)
    try:
        text = override(Path(compose).read_text(encoding="utf-8"), stand_in, own_image)
    except MissingStandIn as exc:
        print(f"compose-images: {exc}", file=sys.stderr)
        return 1
    Path(out + ".tmp").write_text(text, encoding="utf-8")
    os.replace(out + ".tmp", out)
    print(f"override: {out} ({text.count(chr(10) + '    image:')} services)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
