# The Pacifica downloader webhook service.
# Build: docker build -t pacifica/downloader-service .
# Run:   docker run -p 8080:8080 -e CARTD_URL=http://cartd:8081 \
#            -v downloads:/data -v state:/state pacifica/downloader-service
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY setup.py pyproject.toml README.md ./
COPY downloader_service ./downloader_service
RUN pip install . \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin downloader \
    && mkdir -p /data /state \
    && chown downloader /data /state

# In a container the service listens on every interface; downloads go to /data, the job
# store (SQLite unless DOWNLOADER_DATABASE_URL names PostgreSQL) to /state: mount volumes
# there. No VOLUME instruction: it would give every container (the compose file's workers and
# one-shot `subscribe` too) anonymous volumes that `down -v` of podman-compose leaves behind.
ENV DOWNLOADER_HOST=0.0.0.0 \
    DOWNLOADER_PORT=8080 \
    DOWNLOADER_ROOT=/data \
    DOWNLOADER_STATE_DIR=/state \
    CARTD_URL=http://cartd:8081

USER downloader
WORKDIR /data
EXPOSE 8080

# Liveness, not readiness: a container whose Cartd is away is not broken, and restarting it
# would not bring Cartd back (orchestrators that route traffic should ask /health/ready).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=4)"]

ENTRYPOINT ["downloader-service"]
CMD ["serve"]
