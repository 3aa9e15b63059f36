#!/bin/sh
# SageMaker starts the container as `docker run IMAGE serve`; any other command runs as given
# (`docker run -it IMAGE bash`, `docker run IMAGE python -c ...`).
#
# `serve [FLAGS...]` starts the server on 0.0.0.0, port SAGEMAKER_BIND_TO_PORT (SageMaker sets it for
# inference pipelines) or 8080, with /opt/ml/model as the model directory when it exists
# (LLM_ENDPOINT_MODEL_DIR moves it, for hosts other than SageMaker). Where the model comes from,
# that directory or HF_MODEL_ID / OPTION_MODEL_ID including s3://, is decided by the server.
# FLAGS go last, so they override these defaults.
set -eu

if [ "$#" -gt 0 ] && [ "$1" != "serve" ]; then
    exec "$@"
fi
[ "$#" -eq 0 ] || shift

model_dir=${LLM_ENDPOINT_MODEL_DIR:-/opt/ml/model}
if [ -d "$model_dir" ]; then
    set -- --model-dir "$model_dir" "$@"
fi
exec llm-endpoint serve --host 0.0.0.0 --port "${SAGEMAKER_BIND_TO_PORT:-8080}" "$@"
