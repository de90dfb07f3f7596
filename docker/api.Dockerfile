# syntax=docker/dockerfile:1.7
# reasonq API image, also used by Flower.
#
# Base dependencies only (`pip install .`): the API never imports a runtime, so this image
# carries no onnxruntime, transformers or torch (tests/test_compose.py checks it).
#
#   docker build -f docker/api.Dockerfile -t reasonq-api .
#   docker run -p 8000:8000 -e REASONQ_REDIS_URL=redis://redis-host:6379/0 reasonq-api
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

# The package goes to site-packages, where core/settings.py's default profiles path (beside
# the package) does not exist: point it at the copy under /app.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    REASONQ_PROFILES_FILE=/app/config/profiles.toml

RUN useradd --system --uid 10001 --create-home --home-dir /home/reasonq reasonq
WORKDIR /app

# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"]))' \
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
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "api.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", \
     "--timeout-keep-alive", "65"]
