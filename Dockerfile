# One image for the coordinator, the peers and the job client.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# CPU torch keeps the image small; build with --build-arg TORCH_INDEX=... for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY coordinator ./coordinator
COPY peer ./peer
COPY aggregation ./aggregation
RUN pip install .
EXPOSE 50051
CMD ["dml-coordinator", "--host", "0.0.0.0", "--port", "50051", "--state-dir", "/var/lib/dml"]
