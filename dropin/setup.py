"""Packaging for the drop-in ``pacifica-downloader``: upstream's import path over this project.

Built from this directory (``pip install ./dropin``), it is the distribution
``pacifica-downloader`` that pacifica-dispatcher and pacifica-cli require, so that pip keeps it
and never fetches upstream's. It holds only ``pacifica/downloader``: ``pacifica`` stays a
namespace package that other Pacifica distributions install into.
"""

from pathlib import Path

from setuptools import setup

# One version for both distributions: the drop-in is tested against exactly this library.
VERSION = "0.5.0"

setup(
    name="pacifica-downloader",
    version=VERSION,
    description="Drop-in pacifica.downloader on pacifica-downloader-service: safe, verified downloads",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="LGPL-3.0-or-later",
    python_requires=">=3.11",
    packages=["pacifica.downloader"],
    package_data={"pacifica.downloader": ["py.typed"]},
    install_requires=[f"pacifica-downloader-service=={VERSION}"],
    classifiers=["Programming Language :: Python :: 3.11", "Topic :: Scientific/Engineering"],
)
