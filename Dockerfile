# Image of the ERP → Kafka event pipeline: one image for every component, chosen by the command
# (`pipeline relay`, `pipeline worker wms`, `pipeline outbox install`, ...).
#
#   docker build -t erp-pipeline .
#   docker run --rm erp-pipeline --help
#
# The configuration file is read from PIPELINE_CONFIG (mount it, e.g. at
# /etc/pipeline/pipeline.yaml); secrets come from the environment (PIPELINE_DATABASE__URL ...).

# -- builder: the project's wheel, then a virtual environment with it and the parquet extra ----
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# What the wheel is built from (hatchling: pyproject.toml, README.md, pipeline/, connectors/,
# schemas/ as pipeline/_catalogue); .dockerignore keeps the rest out of the context.
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY connectors ./connectors
COPY schemas ./schemas

RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install "$(ls /dist/erp_pipeline-*.whl)[parquet]" \
 && /opt/venv/bin/pipeline --version

# -- runtime ----------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="erp-pipeline" \
      org.opencontainers.image.description="ERP → Kafka event pipeline: outbox relay, consumer workers (WMS, CRM, BI), DLQ tooling" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:${PATH}"

RUN groupadd --system --gid 10001 pipeline \
 && useradd --system --uid 10001 --gid pipeline --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin pipeline

COPY --from=builder /opt/venv /opt/venv

WORKDIR /tmp
USER 10001:10001

# /healthz, /readyz and /metrics of the relay and the workers (relay.health_port /
# workers.<name>.health_port set to 9000 in the configuration).
EXPOSE 9000

# Liveness of a relay or worker; one-shot commands (outbox install, topics apply) and the
# reference servers override or disable it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9000/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["pipeline"]
CMD ["--help"]
