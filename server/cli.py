"""`llm-endpoint serve` and `llm-endpoint demo-model`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_endpoint.backends.config import ConfigError, ServingConfig
from llm_endpoint.server.config import (
    SAGEMAKER_MODEL_DIR,
    bind_port,
    cache_root,
    load_config,
    log_level,
    model_id_configured,
)

if TYPE_CHECKING:  # imported when serving, not for `--help`
    from llm_endpoint.server.startup import StartingApp

log = logging.getLogger("llm_endpoint")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _model_dir(arg: str | None) -> tuple[Path | None, bool]:
    """--model-dir, else SageMaker's mount, else (when no model id is configured) the demo model's directory;
    and whether it is the demo model's, which is fetched only once the port is bound."""
    if arg:
        return Path(arg), False
    if SAGEMAKER_MODEL_DIR.is_dir() and any(SAGEMAKER_MODEL_DIR.iterdir()):
        return SAGEMAKER_MODEL_DIR, False
    if model_id_configured(os.environ):
        return None, False
    from llm_endpoint.server.demo_model import demo_model_dir

    log.info("no model directory given: serving the demo model")
    return demo_model_dir(cache_root(os.environ)), True


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


def _error(message: str) -> int:
    """Every start-up failure ends the same way: one line on stderr, exit code 2."""
    print(f"llm-endpoint: error: {message}", file=sys.stderr)
    return 2


def _run_server(app: StartingApp, config: ServingConfig, host: str, port: int, log_level: str) -> int:
    """Serve `app` until a signal, or `app` itself on a start-up failure, stops it; the drain's exit status."""
    from llm_endpoint.server import http_server

    server = http_server.make_server(app, config, host=host, port=port, log_level=log_level)
    app.stop = lambda: setattr(server, "should_exit", True)
    try:
        return http_server.run(server)
    except SystemExit:  # uvicorn's exit when it cannot bind, after logging why
        app.error = app.error or f"cannot listen on {host}:{port}"
        return 2


def serve(args: argparse.Namespace) -> int:
    from llm_endpoint.server.startup import StartingApp

    try:
        port = args.port if args.port is not None else bind_port(os.environ)
        model_dir, demo = _model_dir(args.model_dir)
        config = load_config(model_dir, os.environ)
    except ConfigError as exc:
        return _error(str(exc))

    def build() -> tuple[Any, Any]:  # runs once the port is bound; /ping answers 503 meanwhile
        from llm_endpoint.server.app import create_app
        from llm_endpoint.server.demo_model import prepare_demo_model

        if demo:
            prepare_demo_model(config.cache_dir)
        service = build_service(config)
        return create_app(service), service

    app = StartingApp(config.model_name, build)
    status = _run_server(app, config, args.host, port, args.log_level.lower())
    return _error(app.error) if app.error else status


def demo_model(args: argparse.Namespace) -> int:
    from llm_endpoint.server.demo_model import prepare_demo_model

    try:
        print(prepare_demo_model(cache_root(os.environ)))
    except ConfigError as exc:
        return _error(str(exc))
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
