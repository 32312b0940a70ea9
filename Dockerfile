# jfsync container image: the replicator as a non-root user, its ledger on the /data volume.
#
#   docker build -t jfsync .
#   docker run -v ./jfsync.yaml:/config/jfsync.yaml:ro -v jfsync-data:/data -p 127.0.0.1:8097:8097 jfsync
#
# The config is read from /config/jfsync.yaml; set `ledger: /data/jfsync.db` and
# `status.listen: 0.0.0.0:8097` in it (see examples/jfsync.compose.yaml). The healthcheck runs
# `jfsync status --healthz` with that config (it finds the port and the status token there),
# so the image needs no curl.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels for jfsync and its dependencies --------------------------------------
FROM ${PYTHON_IMAGE} AS build
# constraints.txt pins every dependency and the build backend (PIP_CONSTRAINT reaches pip's
# isolated build of jfsync too), so an image built today and one built next year hold the same.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/src/constraints.txt
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY jfsync ./jfsync
RUN pip wheel --wheel-dir /wheels .

# --- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed uid, so files on bind mounts and secrets can be granted to it (chown 10001).
RUN groupadd --system --gid 10001 jfsync \
    && useradd --system --uid 10001 --gid jfsync --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin jfsync \
    && mkdir -p /data /config \
    && chown jfsync:jfsync /data
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels jfsync && rm -rf /wheels

USER jfsync
WORKDIR /data
# The ledger (SQLite + WAL) lives here; a named volume keeps it across upgrades.
VOLUME ["/data"]
EXPOSE 8097

HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["jfsync", "status", "--healthz", "--timeout", "5", "--config", "/config/jfsync.yaml"]

ENTRYPOINT ["jfsync"]
CMD ["run", "--config", "/config/jfsync.yaml"]
