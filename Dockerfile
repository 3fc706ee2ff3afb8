# pacs-embed: one image for every role. The command picks it:
#   docker run IMAGE                 -> `pacs-embed run` (everything, a private Redis included)
#   docker run IMAGE listen|worker|push|admin|emulator|status|...
# Production: set PACS_EMBED_REDIS__URL and PACS_EMBED_ENDPOINT__URL, mount /var/lib/pacs-embed
# on durable storage (the spool: the listener and push share it), pass keys as files
# (*_FILE settings pointing at /run/secrets/...). See README "Deploying" and compose.yaml.

# -- build: the wheel and its dependencies (all binary wheels) into a venv -------------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY dicom_listener ./dicom_listener
COPY workers ./workers
COPY emulator ./emulator
COPY pacs_embed ./pacs_embed
# The DICOM codecs (pylibjpeg-*, pyjpegls, python-gdcm) come as manylinux wheels: no compiler.
# The project's wheel is built apart (setuptools only in pip's isolated build environment), then
# installed with binary wheels only; pip and setuptools leave the venv once it is complete.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /src/dist /src \
    && python -m venv /opt/pacs-embed \
    && /opt/pacs-embed/bin/pip install --no-cache-dir --only-binary=:all: /src/dist/*.whl \
    && /opt/pacs-embed/bin/pip check \
    && /opt/pacs-embed/bin/pip uninstall --yes setuptools pip

# -- runtime -----------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm

# redis-server only for the all-in-one `run` (its private Redis); the other roles use
# PACS_EMBED_REDIS__URL. Not version-pinned: the bookworm security archive replaces a fixed
# version as soon as a fix ships, so a pin breaks the build exactly when an update matters.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pacs-embed \
    && useradd --system --uid 10001 --gid pacs-embed --home-dir /var/lib/pacs-embed \
        --no-create-home --shell /usr/sbin/nologin pacs-embed \
    && install -d -o pacs-embed -g pacs-embed -m 0750 /var/lib/pacs-embed

COPY --from=build /opt/pacs-embed /opt/pacs-embed

ENV PATH=/opt/pacs-embed/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PACS_EMBED_STATE_DIR=/var/lib/pacs-embed \
    PACS_EMBED_LISTENER__HOST=0.0.0.0 \
    PACS_EMBED_ADMIN__HOST=0.0.0.0 \
    PACS_EMBED_LOG__FORMAT=json

# Numeric, so a runtime that checks for non-root (runAsNonRoot) can tell: 10001 is pacs-embed.
USER 10001:10001
WORKDIR /var/lib/pacs-embed
VOLUME ["/var/lib/pacs-embed"]
# 11112 DICOM, 2762 DICOM TLS (only with listener.tls_port set), 8080 admin HTTP.
EXPOSE 11112 2762 8080

# /healthz of the admin endpoint (no token needed). Roles without it (listen, worker, push,
# emulator) get their own check, or none, in compose.yaml. No curl in a slim image: Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PACS_EMBED_ADMIN__PORT', '8080'), timeout=4)"]

ENTRYPOINT ["pacs-embed"]
CMD ["run"]
