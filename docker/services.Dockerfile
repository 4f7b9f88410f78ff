# syntax=docker/dockerfile:1.7
# specdec services image: one image, any tier, chosen by the command:
#   specdec serve coordinator | draft | target
# Build (CPU):  docker build -f docker/services.Dockerfile -t specdec:0.1.0 .
# Build (CUDA): docker build -f docker/services.Dockerfile --build-arg VARIANT=cuda -t specdec:0.1.0-cuda .
ARG VARIANT=cpu

# ---- bases: pinned by tag; pin by digest in your registry mirror for reproducible builds ----
FROM python:3.11.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu126

# ---- build: a venv with torch from the variant's index, then the project ----
FROM base-${VARIANT} AS build
ARG TORCH_VERSION=2.13.0
ARG GRPC_HEALTH_PROBE_VERSION=v0.4.37
WORKDIR /src
RUN python -m venv /opt/specdec
ENV PATH=/opt/specdec/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install .
ADD --chmod=755 https://github.com/grpc-ecosystem/grpc-health-probe/releases/download/${GRPC_HEALTH_PROBE_VERSION}/grpc_health_probe-linux-amd64 /opt/specdec/bin/grpc_health_probe

# ---- runtime ----
FROM base-${VARIANT} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="specdec" \
      org.opencontainers.image.description="Distributed speculative decoding: coordinator, draft and target tiers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/specdec/specdec"
RUN groupadd --system --gid 10001 specdec \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/specdec --create-home specdec
COPY --from=build /opt/specdec /opt/specdec
ENV PATH=/opt/specdec/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/specdec \
    HF_HOME=/home/specdec/.cache/huggingface \
    SPECDEC_DEVICE=cpu
USER 10001:10001
WORKDIR /home/specdec
EXPOSE 50051 50052 50053
# The tier's port comes from SPECDEC_PORT (defaults per tier); Kubernetes uses gRPC probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD grpc_health_probe -addr="127.0.0.1:${SPECDEC_PORT:-50051}" || exit 1
ENTRYPOINT ["specdec"]
CMD ["serve", "coordinator"]
