# syntax=docker/dockerfile:1
# The meshtls image: both command lines (meshtls-ca, meshtls-sidecar) in one slim Python
# image, run as an unprivileged user. Build from the repository root:
#   docker build -t meshtls:0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
# The base is pinned to a Python patch release; add its digest (python:...@sha256:...)
# where the build can resolve it.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: a virtual environment with meshtls and its dependencies, from wheels only ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ca_server ./ca_server
COPY sidecar ./sidecar
COPY proto/meshtls ./proto/meshtls
COPY migrations ./migrations
# Dependencies come as binary wheels only (--only-binary): no compiler is needed and none
# is installed. The installer itself (pip, setuptools) leaves the environment afterwards.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/meshtls \
 && /opt/meshtls/bin/pip install --no-cache-dir --only-binary=:all: /wheels/meshtls-*.whl \
 && /opt/meshtls/bin/pip uninstall --yes pip setuptools \
 && /opt/meshtls/bin/python -m compileall -q /opt/meshtls/lib

# --- run ---
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="meshtls" \
      org.opencontainers.image.description="meshtls: a SPIFFE certificate authority (meshtls-ca) and its host agent (meshtls-sidecar)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# Bytecode was compiled at build time; the root filesystem is read-only at run time.
ENV PATH=/opt/meshtls/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric user, so that Kubernetes' runAsNonRoot can check it; the chart runs as 10001.
RUN groupadd --system --gid 10001 meshtls \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin meshtls
COPY --from=build /opt/meshtls /opt/meshtls
USER 10001:10001
WORKDIR /tmp
CMD ["meshtls-ca", "--help"]
