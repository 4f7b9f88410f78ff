# specdec operator image (kopf; no torch). Built by `make images` like services.Dockerfile:
# wheels from build/wheels/operator, BASE a Debian-like image with python3 (3.11) and venv.
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY build/wheels/operator /wheels
RUN python3 -m venv /opt/operator \
 && /opt/operator/bin/pip install --no-index --find-links /wheels specdec-operator \
 && /opt/operator/bin/pip uninstall -y -q pip

FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="specdec-operator" \
      org.opencontainers.image.description="kopf operator reconciling and autoscaling SpeculativeDecoder resources" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/specdec/specdec"
RUN groupadd --system --gid 10001 specdec \
 && useradd --system --uid 10001 --gid 10001 --no-create-home specdec
COPY --from=build /opt/operator /opt/operator
ENV PATH=/opt/operator/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    SPECDEC_OPERATOR_LIVENESS=http://0.0.0.0:8080/healthz
USER 10001:10001
EXPOSE 8080 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["python3", "-m", "specdec_operator"]
