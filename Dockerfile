# pacs-embed: one image for every role (`run`, `listen`, `worker`, `admin`, `emulator`).
# Production: point PACS_EMBED_REDIS__URL at your Redis and PACS_EMBED_ENDPOINT__URL at the
# MedImageInsight endpoint, mount /var/lib/pacs-embed on durable storage, pass the key as a file.
FROM python:3.11-slim-bookworm

# redis-server only for the all-in-one `run`; DCMTK's echoscu for the health check below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server dcmtk \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --home /var/lib/pacs-embed --create-home pacs-embed
WORKDIR /opt/pacs-embed
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY dicom_listener ./dicom_listener
COPY workers ./workers
COPY emulator ./emulator
COPY pacs_embed ./pacs_embed
COPY config ./config
RUN pip install --no-cache-dir . && pip check

USER pacs-embed
ENV PACS_EMBED_STATE_DIR=/var/lib/pacs-embed \
    PACS_EMBED_ADMIN__HOST=0.0.0.0 \
    PACS_EMBED_LOG__FORMAT=json
VOLUME ["/var/lib/pacs-embed"]
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s \
    CMD echoscu -aec PACS_EMBED 127.0.0.1 11112 || exit 1
ENTRYPOINT ["pacs-embed"]
CMD ["run"]
