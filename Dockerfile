# llm-endpoint: an LLM server that follows the SageMaker container contract (`serve`, port 8080, /ping,
# /invocations, model in /opt/ml/model or HF_MODEL_ID / OPTION_MODEL_ID, s3:// included).
#
#   docker build -t llm-endpoint .                          # CPU image: PyTorch CPU wheel, transformers + OpenVINO
#   docker build --build-arg VARIANT=gpu -t llm-endpoint:gpu .   # GPU image: CUDA PyTorch wheel + vLLM
#   docker build --build-arg EXTRAS=s3 -t llm-endpoint:slim .    # choose the extras yourself
#   docker build --build-arg TORCH_INDEX_URL=https://my.mirror/simple .   # torch from another index
#
# Both variants share the python slim base: PyTorch's CUDA wheels carry the CUDA runtime libraries, so the
# GPU image needs only the host's NVIDIA driver, not a CUDA base image.
#
# The CPU image also carries optimum-intel's converter in its own venv, /opt/optimum-venv (it pins an older
# transformers than the server's), and points LLM_ENDPOINT_OPTIMUM_CLI at it: with option.rolling_batch=openvino
# an HF model is then exported to OpenVINO IR once, cached, and served by OpenVINO GenAI (auto serves HF models
# with our engine, which answers every documented parameter, and GGUF/IR with OpenVINO).

# Declared here, before the first FROM, so that `FROM runtime-${VARIANT}` below sees the default: a FROM reads
# only these header arguments. buildah/podman before 1.28 (buildah#4312) resolved a stage name from
# --build-arg values only; there pass --build-arg VARIANT=cpu.
ARG BASE_IMAGE=python:3.11-slim
ARG VARIANT=cpu

FROM ${BASE_IMAGE} AS builder
ARG VARIANT
# Empty: the PyTorch CPU index for cpu, PyPI (CUDA wheels) for gpu.
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, in its own layer: it is most of the image and changes least often.
# torch==2.13.0 matches the pin in pyproject.toml.
RUN case "$VARIANT" in \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      gpu) index=https://pypi.org/simple ;; \
      *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "${TORCH_INDEX_URL:-$index}" torch==2.13.0
# EXTRAS only now, after the torch layer: a build arg invalidates every RUN below its declaration, so
# changing the extras reinstalls the package, not torch. Empty: s3,openvino for cpu, s3,vllm-gpu for gpu.
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY backends ./backends
RUN case "$VARIANT" in cpu) default=s3,openvino ;; gpu) default=s3,vllm-gpu ;; esac \
    && pip install "/src[${EXTRAS:-$default}]"

# optimum-intel, the OpenVINO HF->IR converter, in a venv of its own (as scripts/setup.sh's .venv-optimum):
# it pins an older transformers than the server. Only runtime-cpu copies it, so a gpu build skips this stage.
# Same path here and in the image: a venv's scripts hard-code it.
FROM ${BASE_IMAGE} AS optimum
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU torch wheel from the same index as the server's, before optimum-intel would pull a CUDA one; then
# optimum-intel with torch==2.13.0 named again (as scripts/setup.sh): optimum-intel requires an unpinned
# torchvision, whose newest release requires a newer torch, and pip would replace the CPU torch with a CUDA
# build from PyPI plus its nvidia-* wheels (seen in a buildah build). Pinned, pip keeps the installed CPU torch
# and takes the torchvision release for 2.13.0. Then out with torchvision / torchaudio / torchcodec, builds
# from PyPI that the converter does not use.
RUN python -m venv /opt/optimum-venv \
    && /opt/optimum-venv/bin/pip install --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
        torch==2.13.0 \
    && /opt/optimum-venv/bin/pip install torch==2.13.0 "optimum-intel[openvino]==2.2.0" \
    && /opt/optimum-venv/bin/pip uninstall -y torchvision torchaudio torchcodec \
    && /opt/optimum-venv/bin/optimum-cli export openvino --help > /dev/null

FROM ${BASE_IMAGE} AS runtime-cpu
# option.compile_decode: inductor builds the compiled decode step's C++ kernels with the system C++ compiler.
# DL3008 (pin apt versions): the base image fixes the Debian release, and exact versions vanish from the
# mirrors with each security update, which would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=optimum /opt/optimum-venv /opt/optimum-venv
# option.rolling_batch=openvino converts HF directories with it (once, into the cache).
ENV LLM_ENDPOINT_OPTIMUM_CLI=/opt/optimum-venv/bin/optimum-cli

FROM ${BASE_IMAGE} AS runtime-gpu
# Triton (under vLLM and torch.compile) builds its CUDA launcher with the system C compiler on first use.
# DL3008 (pin apt versions): the base image fixes the Debian release, and exact versions vanish from the
# mirrors with each security update, which would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# What NVIDIA's CUDA images set, so the NVIDIA container runtime exposes the GPUs to this image too.
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

# DL3006 (tag the image) misfires here: runtime-cpu / runtime-gpu are stages of this file, not images.
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
# SageMaker passes SAGEMAKER_BIND_TO_PORT only to images that declare they honour it.
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port="true" \
      org.opencontainers.image.title="llm-endpoint" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --create-home --uid 1000 --user-group app
COPY --from=builder /opt/venv /opt/venv
COPY --chmod=755 deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
# HF_HOME and our cache (s3:// downloads, OpenVINO IR conversions, copies of read-only GGUF files) under /tmp
# as in LMI: writable for any uid the container runs as (`docker run --user`, whose HOME may be /) and on
# SageMaker's instance volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/.cache/huggingface \
    LLM_ENDPOINT_CACHE=/tmp/.cache/llm-endpoint
USER 1000:1000
WORKDIR /home/app
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["serve"]
