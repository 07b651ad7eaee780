"""Real services on 127.0.0.1 for the tests, the benchmarks and the demo (not installed).

- ``pacifica.py``: the Archive Interface and Cartd from ``.venv-pacifica``
  (``scripts/install-pacifica-stack.sh`` makes it);
- ``notifications.py``: pacifica-notifications (REST server + Celery worker) and a Policy
  stand-in, on a PostgreSQL database;
- ``postgres.py``: a throw-away PostgreSQL cluster run as an unprivileged user
  (``scripts/install-postgres.sh`` installs the server).
"""
