"""`llm-endpoint serve` and `llm-endpoint demo-model`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from llm_endpoint.backends.config import ConfigError, ServingConfig
from llm_endpoint.server.config import (
    SAGEMAKER_MODEL_DIR,
    bind_port,
    cache_root,
    load_config,
    log_level,
    model_id_configured,
)

log = logging.getLogger("llm_endpoint")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _model_dir(arg: str | None) -> Path | None:
    """--model-dir, else SageMaker's mount, else (when no model id is configured) the demo model."""
    if arg:
        return Path(arg)
    if SAGEMAKER_MODEL_DIR.is_dir() and any(SAGEMAKER_MODEL_DIR.iterdir()):
        return SAGEMAKER_MODEL_DIR
    if model_id_configured(os.environ):
        return None
    from llm_endpoint.server.demo_model import prepare_demo_model

    log.info("no model directory given: serving the demo model")
    return prepare_demo_model(cache_root(os.environ))


def prepare_model(config: ServingConfig) -> tuple[Any, Any, int]:
    """(ModelFiles, tokenizer, max_model_len) for `config`, as every engine is given them.

    Also used by scripts/bench_direct.py, so the engines it calls directly are set up exactly as served.
    """
    from llm_endpoint.backends.model_files import (
        ModelFilesError,
        load_tokenizer,
        locate_model,
        model_max_length,
    )
    from llm_endpoint.server.model_store import ModelLocationError, resolve_model_location

    try:
        location = resolve_model_location(config.model_id, config.cache_dir / "models")
        files = locate_model(location)
    except (ModelFilesError, ModelLocationError) as exc:
        raise ConfigError(f"invalid option.model_id={config.model_id!r}: {exc}") from None
    tokenizer = load_tokenizer(files, config.trust_remote_code, config.revision)
    model_len = model_max_length(files, config.trust_remote_code)
    max_model_len = config.max_model_len or model_len or 4096
    if model_len and config.max_model_len and config.max_model_len > model_len:
        log.warning("option.max_model_len=%d exceeds the model's %d positions", config.max_model_len, model_len)
    return files, tokenizer, max_model_len


def build_service(config: ServingConfig):  # -> InferenceService; imports deferred to keep `--help` fast
    from llm_endpoint.backends.errors import BackendUnavailable
    from llm_endpoint.backends.registry import create_backend
    from llm_endpoint.server.serving import InferenceService

    files, tokenizer, max_model_len = prepare_model(config)
    try:
        backend = create_backend(config, files, tokenizer, max_model_len)
    except BackendUnavailable as exc:
        raise ConfigError(str(exc)) from None
    log.info("model %s from %s, backend %s, max_model_len %d", config.model_name, files.path, backend.name,
             max_model_len)
    return InferenceService(config, tokenizer, backend, max_model_len)


def serve(args: argparse.Namespace) -> int:
    from llm_endpoint.server import http_server
    from llm_endpoint.server.app import create_app

    try:
        port = args.port if args.port is not None else bind_port(os.environ)
        config = load_config(_model_dir(args.model_dir), os.environ)
        service = build_service(config)
    except ConfigError as exc:
        print(f"llm-endpoint: error: {exc}", file=sys.stderr)
        return 2
    limits = http_server.HttpLimits(config.max_header_size, config.header_read_timeout, config.max_connections)
    return http_server.run(create_app(service), host=args.host, port=port, limits=limits,
                           keep_alive_timeout=config.keep_alive_timeout,
                           graceful_shutdown_timeout=config.graceful_shutdown_timeout, log_level=args.log_level.lower())


def demo_model(args: argparse.Namespace) -> int:
    from llm_endpoint.server.demo_model import prepare_demo_model

    print(prepare_demo_model(cache_root(os.environ)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-endpoint", description=__doc__)
    parser.add_argument("--log-level", default=log_level(os.environ),
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve a model over HTTP (SageMaker LMI contract)")
    p_serve.add_argument("--model-dir", help="model directory (default: /opt/ml/model if present, else the demo model)")
    p_serve.add_argument("--host", default="0.0.0.0",
                         help="address to listen on (default: every interface, as SageMaker needs; on a laptop use 127.0.0.1)")
    p_serve.add_argument("--port", type=int, help="default: $SAGEMAKER_BIND_TO_PORT, else 8080")
    p_serve.set_defaults(func=serve)
    p_demo = sub.add_parser("demo-model", help="prepare the demo model if needed and print its directory")
    p_demo.set_defaults(func=demo_model)
    args = parser.parse_args(argv)
    _setup_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
