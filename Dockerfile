# One image for the coordinator, the peers and the job client.
#   docker build -t dml .     python:3.12-slim, packages from PyPI (CPU torch from PyTorch's index)
#   docker build --build-arg BASE_IMAGE=dml-base:bookworm -t dml .
#                             offline: scripts/docker_base.sh built that image and ./wheels, and pip
#                             reads nothing but ./wheels
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/dml
# `wheel[s]` matches ./wheels when it exists and nothing otherwise; the Dockerfile, always there and
# seldom changed, keeps the COPY valid either way (a COPY none of whose sources match fails)
# without costing the torch layer its cache.
COPY Dockerfile wheel[s] /wheels/
# torch first, in its own layer, so that code changes do not reinstall it. CPU torch keeps the
# image small; build with --build-arg TORCH_INDEX=... for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
      echo "dml: installing from the wheelhouse only"; \
      /opt/dml/bin/pip install --no-index --find-links /wheels torch; \
    else \
      /opt/dml/bin/pip install torch --index-url "${TORCH_INDEX}"; \
    fi
COPY . /src
RUN if ls /wheels/*.whl >/dev/null 2>&1; then \
      /opt/dml/bin/pip install --no-index --find-links /wheels /src; \
    else \
      /opt/dml/bin/pip install /src; \
    fi

FROM ${BASE_IMAGE}
COPY --from=build /opt/dml /opt/dml
ENV PATH=/opt/dml/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
EXPOSE 50051
CMD ["dml-coordinator", "--host", "0.0.0.0", "--port", "50051", "--state-dir", "/var/lib/dml"]
