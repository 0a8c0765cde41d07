# octa3d on a CUDA GPU server:
#   docker build -t octa3d .
#   docker run --gpus all -v /path/to/OCTA-500:/workspace/data -v $PWD/runs:/workspace/runs \
#       octa3d python main.py --dim 3d --model resnet50 --mode ae_pretrain
# The base image is pinned; override with --build-arg BASE_IMAGE=... for another CUDA/PyTorch pair
# (octa3d accepts torch >=2.8,<2.14).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
# Dependencies first (cached layer), with the same `make install` the README and CI use. The virtualenv sees the
# image's CUDA torch (--system-site-packages) and TORCH_SPEC pins that exact version, so pip never replaces it.
COPY pyproject.toml Makefile README.md main.py ./
COPY octa3d ./octa3d
RUN make install VENV=/opt/octa3d VENV_FLAGS=--system-site-packages PYTHON=python \
        TORCH_SPEC="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
ENV PATH=/opt/octa3d/bin:$PATH

COPY . .
# ./data is the default --data-root: mount the dataset there. ./runs holds the experiments.
RUN mkdir -p /workspace/data /workspace/runs
VOLUME ["/workspace/data", "/workspace/runs"]
CMD ["python", "main.py", "--help"]
