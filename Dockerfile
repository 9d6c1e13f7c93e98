# syntax=docker/dockerfile:1
#
# The herd image: Ray 2.60 (Python 3.11, CUDA) + herd, and the CLIs the Helm chart's init containers use
# (`hf` for Hugging Face downloads, `aws` for S3). Every pod of the RayService runs it: the Ray head, the GPU
# workers, the download / demo-checkpoint init containers.
#
#   docker build -t ghcr.io/your-org/herd:0.1.0 .
#
# CPU-only image for the kind / minikube demo (helm/examples/cpu-demo.yaml): a CPU Ray base and CPU torch
# wheels keep it a few GB smaller:
#
#   docker build -t herd:0.1.0 \
#     --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# The Ray version of the base image must match the chart's rayVersion and herd's ray[serve] pin (2.60.0).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# Where torch comes from: PyPI's default wheels carry CUDA; point this at a CPU wheel index for a CPU image.
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.13.0

# The base image runs as user "ray" (uid 1000) with conda's Python first on PATH; install into that Python.
WORKDIR /home/ray/herd

# torch first, from the chosen index, so `pip install .` finds its pin already satisfied.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# herd's CPU kernels (workers/csrc) are compiled with g++ on first use on a CPU replica (without a compiler
# the engine logs it and runs the slower portable torch paths). The Ray images run as "ray" with sudo.
RUN sudo apt-get update && sudo apt-get install -y --no-install-recommends g++ && sudo rm -rf /var/lib/apt/lists/*

# Download tools for the chart's weights.source=download init container.
RUN pip install --no-cache-dir "huggingface_hub==2.4.0" "awscli==1.46.2"

# herd itself (a regular, non-editable install: packages workers, cluster, proto; console script `herd`).
# Only the package sources are copied, never a local .venv or build output.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users workers ./workers
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users proto ./proto
COPY --chown=ray:users benchmarks ./benchmarks
RUN pip install --no-cache-dir ".[tracing]" && herd --help > /dev/null

# Serve's proxies (HTTP 8000, gRPC 9000), Ray's metrics (8080); the head also uses 6379, 8265, 10001.
EXPOSE 8000 9000 8080
# KubeRay supplies the `ray start` command; run alone, the image serves the embedded demo. On SIGTERM herd serve
# lets open streams finish (up to the longest graceful_shutdown_timeout_s, 60 s by default): give `docker stop`
# that long (`docker stop -t 70`, compose `stop_grace_period: 70s`); Docker's default kills it after 10 s.
CMD ["herd", "serve", "--host", "0.0.0.0"]
