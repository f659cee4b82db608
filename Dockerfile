# syntax=docker/dockerfile:1
# Multi-stage image for itemstream. Build: docker build -t itemstream .
# Runs as a non-root numeric user and works with a read-only root filesystem (mount a tmpfs or
# emptyDir on /tmp; /dev/shm is used for gunicorn's heartbeat files).

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: the locked dependencies in a virtual environment, no dev tools ----------------
FROM ${PYTHON_IMAGE} AS builder
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# uv from PyPI (no other registry or image is needed); pinned to the version that wrote uv.lock.
RUN pip install uv==0.13.9
WORKDIR /app
# Dependencies first: this layer is reused until pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY README.md alembic.ini ./
COPY alembic ./alembic
COPY app ./app
RUN uv sync --frozen --no-dev
# UV_COMPILE_BYTECODE compiles the dependencies, not the project's own code (an editable
# install): without this each process of a read-only container compiles app/ again at every
# start (PYTHONDONTWRITEBYTECODE), about 0.15 s of each cold start. Hash-checked, so the
# copy's timestamps do not matter.
RUN python -m compileall -q --invalidation-mode checked-hash app alembic
# The commit, for itemstream_build_info and the image's labels (docker build --build-arg
# REVISION=$(git rev-parse HEAD)).
ARG REVISION=unknown
RUN echo "$REVISION" > app/REVISION

# --- base: the venv and the code, nothing else ----------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ARG REVISION=unknown
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="itemstream" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HOST=0.0.0.0 \
    PORT=8000
WORKDIR /app
COPY --from=builder --chown=0:0 /app /app
EXPOSE 8000
ENTRYPOINT ["itemstream"]

# --- dev: the skaffold loop. Synced *.py files land in /app/app and uvicorn reloads ---------
FROM base AS dev
RUN chown -R 10001:10001 /app/app
USER 10001:10001
ENV ENVIRONMENT=development
CMD ["serve", "--reload"]

# --- runtime (the default target): read-only code, production settings ----------------------
FROM base AS runtime
ENV ENVIRONMENT=production
USER 10001:10001
CMD ["serve"]
