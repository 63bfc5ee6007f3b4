# One image for the coordinator, the peers and the job client.
#   docker build -t dml .     python:3.12-slim, packages from PyPI (CPU torch from PyTorch's index)
#   docker build --build-arg BASE_IMAGE=dml-base:bookworm -t dml .
#                             offline: scripts/docker_base.sh built that image and ./wheels, and pip
#                             reads nothing but ./wheels
# Three stages, so that a change to the code rebuilds one small layer: `deps` (torch, then the
# other dependencies pyproject.toml names, in a venv), `app` (dml itself as a wheel), and the image
# (deps' venv, a layer shared by every build with the same dependencies, then that wheel).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/dml
# `wheel[s]` matches ./wheels when it exists and nothing otherwise; the Dockerfile, always there and
# seldom changed, keeps the COPY valid either way (a COPY none of whose sources match fails)
# without costing the torch layer its cache.
COPY Dockerfile wheel[s] /wheels/
# torch first, in its own layer. CPU torch keeps the image small; build with
# --build-arg TORCH_INDEX=... for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
      echo "dml: installing from the wheelhouse only"; \
      /opt/dml/bin/pip install --no-index --find-links /wheels torch; \
    else \
      /opt/dml/bin/pip install torch --index-url "${TORCH_INDEX}"; \
    fi
# The other dependencies and the build backend, from pyproject.toml alone: rebuilt only when it
# changes, not with the code.
COPY pyproject.toml /src/pyproject.toml
RUN /opt/dml/bin/python -c 'import tomllib; t = tomllib.load(open("/src/pyproject.toml", "rb")); \
print("\n".join(t["project"]["dependencies"] + t["build-system"]["requires"]))' > /src/requirements.txt && \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
      /opt/dml/bin/pip install --no-index --find-links /wheels -r /src/requirements.txt; \
    else \
      /opt/dml/bin/pip install -r /src/requirements.txt; \
    fi

FROM deps AS app
COPY . /src
RUN /opt/dml/bin/pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /dist /src

FROM ${BASE_IMAGE}
COPY --from=deps /opt/dml /opt/dml
COPY --from=app /dist /dist
RUN /opt/dml/bin/pip install --no-cache-dir --no-deps --no-index /dist/*.whl && rm -rf /dist
ENV PATH=/opt/dml/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
EXPOSE 50051
CMD ["dml-coordinator", "--host", "0.0.0.0", "--port", "50051", "--state-dir", "/var/lib/dml"]
