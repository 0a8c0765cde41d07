# octa3d on a CUDA GPU server:
#   docker build -t octa3d .
#   docker run --gpus all --ipc=host --user "$(id -u):$(id -g)" \
#       -v /path/to/OCTA-500:/workspace/data -v $PWD/runs:/workspace/runs \
#       octa3d octa3d --mode ae_pretrain --dim 3d --model resnet50 --exp my-exp
#
# --ipc=host (or --shm-size=8g): DataLoader workers (--num-workers > 0) pass batches through shared memory, and
#   Docker's default /dev/shm of 64 MB makes them fail with "bus error" / "DataLoader worker ... killed".
# --user "$(id -u):$(id -g)": the image runs as the unprivileged user `octa3d` (uid 1000) by default; with your own
#   uid/gid the files written into the mounted runs/ folder belong to you (and the data mount only needs to be
#   readable by you).
# The base image is pinned; override with --build-arg BASE_IMAGE=... for another CUDA/PyTorch pair
# (octa3d accepts torch >=2.8,<2.14).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLCONFIGDIR=/tmp/matplotlib
RUN apt-get update && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
# 1. Dependencies, in a layer of their own: only pyproject.toml and the Makefile are copied, so editing the code
#    (or the README) does not reinstall them. It is the same `make install` the README and CI use; the package
#    itself is a placeholder here (an empty octa3d/ and README.md). The virtualenv sees the image's CUDA torch
#    (--system-site-packages) and TORCH_SPEC pins that exact version, so pip never replaces it.
COPY pyproject.toml Makefile ./
RUN mkdir octa3d && touch octa3d/__init__.py README.md \
    && make install VENV=/opt/octa3d VENV_FLAGS=--system-site-packages PYTHON=python \
        TORCH_SPEC="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
ENV PATH=/opt/octa3d/bin:$PATH

# 2. The code: the same editable install, without touching the dependencies.
COPY . .
RUN python -m pip install --no-deps -e ".[test]"

# 3. Not root at run time. ./data is the default --data-root: mount the dataset there; ./runs holds the experiments.
RUN useradd --create-home --uid 1000 octa3d \
    && mkdir -p /workspace/data /workspace/runs && chown octa3d /workspace/data /workspace/runs \
    && chmod 1777 /workspace/runs
USER octa3d
VOLUME ["/workspace/data", "/workspace/runs"]
CMD ["octa3d", "--help"]
