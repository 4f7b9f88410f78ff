# syntax=docker/dockerfile:1.7
# specdec operator image (kopf; no torch).
# Build: docker build -f docker/operator.Dockerfile -t specdec-operator:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/operator
ENV PATH=/opt/operator/bin:$PATH
COPY operator /src/operator
RUN pip install /src/operator

FROM python:3.11.11-slim-bookworm
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="specdec-operator" \
      org.opencontainers.image.description="kopf operator reconciling and autoscaling SpeculativeDecoder resources" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/specdec/specdec"
RUN groupadd --system --gid 10001 specdec \
 && useradd --system --uid 10001 --gid 10001 --no-create-home specdec
COPY --from=build /opt/operator /opt/operator
ENV PATH=/opt/operator/bin:$PATH PYTHONUNBUFFERED=1 \
    SPECDEC_OPERATOR_LIVENESS=http://0.0.0.0:8080/healthz
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"
ENTRYPOINT ["python", "-m", "specdec_operator"]
