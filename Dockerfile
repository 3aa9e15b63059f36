# llm-endpoint: an LLM server that follows the SageMaker container contract (`serve`, port 8080, /ping,
# /invocations, model in /opt/ml/model or HF_MODEL_ID / OPTION_MODEL_ID, s3:// included).
#
#   docker build -t llm-endpoint .                          # CPU image: PyTorch CPU wheel, transformers engine
#   docker build --build-arg VARIANT=gpu -t llm-endpoint:gpu .   # GPU image: CUDA PyTorch wheel + vLLM
#   docker build --build-arg EXTRAS=s3,openvino -t llm-endpoint:ov .   # choose the extras yourself
#
# Both variants share the python slim base: PyTorch's CUDA wheels carry the CUDA runtime libraries, so the
# GPU image needs only the host's NVIDIA driver, not a CUDA base image.

ARG BASE_IMAGE=python:3.11-slim
ARG VARIANT=cpu

FROM ${BASE_IMAGE} AS builder
ARG VARIANT
ARG EXTRAS=""
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
    && pip install --index-url "$index" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY backends ./backends
RUN case "$VARIANT" in cpu) default=s3 ;; gpu) default=s3,vllm-gpu ;; esac \
    && pip install "/src[${EXTRAS:-$default}]"

FROM ${BASE_IMAGE} AS runtime-cpu

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
# HF_HOME under /tmp as in LMI: writable for the non-root user and on SageMaker's instance volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/.cache/huggingface
USER 1000:1000
WORKDIR /home/app
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["serve"]
