# specdec services image: one image, any tier, chosen by the command:
#   specdec serve coordinator | draft | target
# Built by `make images` (buildah, no Docker daemon): the wheels come from build/wheels/services,
# which `docker/build.sh` fills from the package index pip is configured with, so the build
# itself needs no network. BASE is any Debian-like image with python3 (3.11) and venv:
#   localhost/specdec-base:bookworm   debootstrapped here when no registry is reachable (default of make)
#   docker.io/library/python:3.11-slim-bookworm   the official image, where a registry is reachable
# The CUDA variant is the same file with other wheels: VARIANT=cuda puts PyPI's torch (built
# against CUDA, its runtime in nvidia-* wheels) in the wheelhouse; the node's driver comes
# from the NVIDIA container toolkit, so no CUDA base image is needed.
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY build/wheels/services /wheels
# pip compiles every module to bytecode here: the root filesystem is read-only at run time.
RUN python3 -m venv /opt/specdec \
 && /opt/specdec/bin/pip install --no-index --find-links /wheels specdec \
 && /opt/specdec/bin/pip uninstall -y -q pip
COPY docker/grpc-health.py /opt/specdec/bin/specdec-health
RUN chmod 0755 /opt/specdec/bin/specdec-health

FROM ${BASE}
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
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/specdec \
    HF_HOME=/home/specdec/.cache/huggingface \
    SPECDEC_DEVICE=cpu
USER 10001:10001
WORKDIR /home/specdec
EXPOSE 50051 50052 50053 9464
# The tier's port comes from SPECDEC_PORT (default 50051 here); Kubernetes uses gRPC probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["specdec-health"]
ENTRYPOINT ["specdec"]
CMD ["serve", "coordinator"]
