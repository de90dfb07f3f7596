# syntax=docker/dockerfile:1.7
# reasonq worker images, one Dockerfile for every flavour:
#
#   target  FLAVOR  EXTRAS   image
#   worker  cpu     cpu      CPU worker: onnxruntime (CPU) + transformers, Ollama/vLLM clients
#   worker  gpu     gpu      GPU worker: CUDA + cuDNN runtime base, onnxruntime-gpu
#   convert cpu     cpu      the worker plus the `convert` extra (torch CPU wheels, gguf,
#                            onnxruntime-genai, onnx): runs `reasonq fetch-default-model`
#
#   docker build -f docker/worker.Dockerfile --build-arg FLAVOR=cpu --build-arg EXTRAS=cpu \
#       --target worker -t reasonq-worker:cpu .
#   docker build -f docker/worker.Dockerfile --build-arg FLAVOR=gpu --build-arg EXTRAS=gpu \
#       --target worker -t reasonq-worker:gpu .
#   docker build -f docker/worker.Dockerfile --build-arg FLAVOR=cpu --build-arg EXTRAS=cpu \
#       --target convert -t reasonq-worker:convert .
#
# onnxruntime and onnxruntime-gpu must never share an image: pick EXTRAS=cpu or gpu, not both.
ARG FLAVOR=cpu
ARG CPU_BASE_IMAGE=python:3.12-slim-bookworm
# onnxruntime-gpu wheels on PyPI are built for CUDA 12 and cuDNN 9: keep the base in step.
ARG GPU_BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CPU_BASE_IMAGE} AS base-cpu
RUN python -m venv /opt/venv

FROM ${GPU_BASE_IMAGE} AS base-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
# The NVIDIA container toolkit mounts the driver; these select what it exposes.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM base-${FLAVOR} AS worker
ARG EXTRAS=cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    REASONQ_PROFILES_FILE=/app/config/profiles.toml \
    REASONQ_DATA_DIR=/data

RUN useradd --system --uid 10001 --create-home --home-dir /home/reasonq reasonq \
    && mkdir -p /data/models \
    && chown -R reasonq:reasonq /data
WORKDIR /app

# Base dependencies plus the EXTRAS (comma-separated) read from pyproject.toml: this layer is
# rebuilt only when pyproject.toml or EXTRAS change.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; reqs = list(p["dependencies"]); [reqs.extend(p["optional-dependencies"][e]) for e in sys.argv[1].split(",") if e]; print("\n".join(reqs))' "${EXTRAS}" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY README.md ./
COPY config ./config
COPY core ./core
COPY api ./api
COPY workers ./workers
COPY runtimes ./runtimes
COPY scripts ./scripts
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps .

USER reasonq
# Prometheus metrics (REASONQ_WORKER_METRICS_PORT).
EXPOSE 9101
# Celery's warm shutdown on SIGTERM finishes running jobs: give it the job deadline
# (compose: stop_grace_period; Kubernetes: terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "workers.celery_app", "worker", "-Q", "cpu", "-E", "--hostname", "cpu@%h"]

FROM worker AS convert
# torch from the CPU wheel index: the conversion runs on CPU and the CUDA wheels are ~2.5 GB.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
USER root
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["optional-dependencies"]["convert"]))' \
        > /tmp/requirements-convert.txt \
    && pip install --extra-index-url "${TORCH_INDEX_URL}" -r /tmp/requirements-convert.txt
USER reasonq
CMD ["reasonq", "fetch-default-model"]
