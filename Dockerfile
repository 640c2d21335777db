# syntax=docker/dockerfile:1
#
#   docker build --target cpu -t protoserve:cpu .         engine (gRPC :50051) + OpenAI bridge (:8000)
#   docker run -p 8000:8000 -p 50051:50051 protoserve:cpu
#   docker run -v /models/llama:/model ... protoserve:cpu --host 0.0.0.0 --model /model
#
#   docker build --target engine -t protoserve:engine .   CUDA engine (gRPC :50051, metrics :9090),
#   docker run --gpus all -v /models/llama:/model protoserve:engine --model /model
#   meant to run with the bridge as a sidecar (examples/k8s/):
#
#   docker build --target bridge -t protoserve:bridge .   OpenAI bridge alone, no torch (a sidecar
#   in front of an engine in another container):
#   docker run -p 8000:8000 protoserve:bridge --host 0.0.0.0 --engine-address 10.0.0.5:50051

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Servers have no reason to run as root.
RUN useradd --create-home --uid 1000 protoserve
WORKDIR /app

# Builds the project wheel, so the runtime image carries neither a source tree nor setuptools'
# build leftovers.
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY protoserve/ protoserve/
COPY engine/ engine/
COPY rest_bridge/ rest_bridge/
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM base AS cpu
ARG TORCH_VERSION=2.13.0
# torch first, from the CPU index: the project's `torch>=2.4` range would otherwise resolve to
# the default multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
# A bind mount, not COPY: the wheel never becomes a layer of the runtime image. The versions
# are the ones CI tested (constraints.txt, `make lock`).
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install -c /tmp/constraints.txt /wheels/*.whl
USER protoserve
EXPOSE 8000 50051
ENTRYPOINT ["engine-serve"]
CMD ["--host", "0.0.0.0"]

# The bridge imports only the generated stubs and its own package, never `engine`, so it needs
# none of the engine's dependencies (torch, transformers).
# Names only: constraints.txt holds the versions CI tested.
FROM base AS bridge
RUN --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install -c /tmp/constraints.txt \
    grpcio grpcio-status grpcio-health-checking protobuf googleapis-common-protos \
    fastapi uvicorn pydantic prometheus-client
COPY protoserve/ protoserve/
COPY rest_bridge/ rest_bridge/
ENV PYTHONPATH=/app
USER protoserve
EXPOSE 8000
ENTRYPOINT ["python", "-m", "rest_bridge"]
# "engine" is the engine's service name in a compose file or Kubernetes namespace.
CMD ["--host", "0.0.0.0", "--engine-address", "engine:50051"]

# The CUDA engine: gRPC only (the bridge runs as a sidecar, examples/k8s/), with the `cuda`
# extra (flash-attn). flash-attn ships only as an sdist, so it builds against the devel image's
# nvcc; the engine also runs without it (our own kernels or torch SDPA).
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE} AS engine
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-dev python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && useradd --create-home --uid 1000 protoserve
ENV PATH=/opt/venv/bin:$PATH
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu124
RUN pip install --index-url ${TORCH_CUDA_INDEX} torch \
    && pip install packaging ninja wheel
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    whl=$(ls /wheels/*.whl) \
    && MAX_JOBS=4 pip install --no-build-isolation -c /tmp/constraints.txt "${whl}[cuda]"
USER protoserve
EXPOSE 50051 9090
ENTRYPOINT ["engine-serve", "--role", "engine"]
CMD ["--host", "0.0.0.0", "--metrics-port", "9090"]
