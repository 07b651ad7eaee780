"""The real Pacifica services on 127.0.0.1, for the tests, the benchmarks and the demo.

Not part of the installed package: ``pacifica.py`` starts the Archive Interface and Cartd from
``.venv-pacifica`` (``scripts/install-pacifica-stack.sh`` makes it).
"""
