"""The server CLI shared by scripts/inference_server.py (backend chosen by the folder: MLX export,
GGUF export, else torch) and scripts/mlx_inference_server.py (MLX by default): flags, API key, model
loading, uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import sys

from ..backends import BACKENDS, BackendError, choose_backend, load_backend  # no torch import here
from ..config import SecretFilter, add_settings_args, load_settings_or_exit, settings_from_args, setup_logging
from .client import read_api_key
from .validation import MAX_FRAME_PIXELS, MAX_REQUEST_PIXELS

CLOSE_TIMEOUT_S = 5.0  # after the drain: how long uvicorn waits for connections to close


def build_parser(settings, default_backend: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_settings_args(
        parser,
        settings,
        [
            "model_path",
            "host",
            "port",
            "mixed_precision",
            "max_seq_length",
            "frame_layout",
            "max_batch",
            "batch_wait_ms",
            "shutdown_grace_s",
        ],
    )
    parser.add_argument(
        "--adapter_path", default=None, help="LoRA adapter folder loaded on top of --model_path (torch backend only)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=default_backend,
        help=f"what runs the model; auto: mlx for an MLX export, gguf (llama.cpp) for a GGUF export, else torch "
        f"(default: {default_backend})",
    )
    parser.add_argument(
        "--api_key_env",
        default=None,
        metavar="VAR",
        help="name of the environment (or .env) variable holding the API key; when set, "
        "/v1/* and /metrics need 'Authorization: Bearer <key>' (the key is never logged)",
    )
    parser.add_argument("--max_body_mb", type=float, default=8.0, help="largest request body in MiB (413 above)")
    parser.add_argument(
        "--frame_cache_size",
        type=int,
        default=128,
        help="vision features of this many frames are kept for session streams (0 = off)",
    )
    parser.add_argument(
        "--max_queue",
        type=int,
        default=64,
        help="model requests allowed to wait or run at once; more get 503 + Retry-After",
    )
    parser.add_argument(
        "--request_timeout_s", type=float, default=600.0, help="a model call slower than this answers 504"
    )
    parser.add_argument(
        "--max_frame_pixels",
        type=int,
        default=MAX_FRAME_PIXELS,
        help=f"most pixels one frame may declare; more: 413 before decoding (default {MAX_FRAME_PIXELS} = 4096x4096)",
    )
    parser.add_argument(
        "--max_request_pixels",
        type=int,
        default=MAX_REQUEST_PIXELS,
        help=f"most pixels the 4 frames of a request may declare together (default {MAX_REQUEST_PIXELS}: "
        "four 2048x2048 frames)",
    )
    parser.add_argument(
        "--decode_workers",
        type=int,
        default=2,
        help="threads that parse and decode requests off the event loop (each decodes one frame at a time)",
    )
    parser.add_argument(
        "--model_version",
        default=None,
        help="version string reported by the API and /metrics (default: folder name + config hash)",
    )
    parser.add_argument("--no_warmup", action="store_true", help="report ready without a warm-up prediction")
    parser.add_argument(
        "--log_level", default="info", choices=("debug", "info", "warning", "error"), help="log verbosity"
    )
    return parser


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


TORCH_DESCRIPTION = """Serve the model over HTTP: POST /v1/predict, POST /v1/chat/completions (OpenAI-compatible),
GET /health, /ready, /metrics. Binds 127.0.0.1 by default."""
MLX_DESCRIPTION = """The inference server with the MLX backend on an exported MLX folder:
`MODEL_PATH=models/pokemon-gemma-mlx python scripts/mlx_inference_server.py`
(MODEL_PATH, HOST, PORT from the environment or .env; every inference_server.py flag works here)."""


def main_mlx(argv=None) -> int:
    return main(argv, default_backend="mlx", description=MLX_DESCRIPTION)


def main(argv=None, default_backend: str = "auto", description: str = TORCH_DESCRIPTION) -> int:
    settings = load_settings_or_exit()
    args = build_parser(settings, default_backend, description).parse_args(argv)
    settings = settings_from_args(settings, args)
    api_key = read_api_key(args.api_key_env)
    log = setup_logging(settings, getattr(logging, args.log_level.upper()))
    if api_key:
        for handler in logging.getLogger().handlers:
            handler.addFilter(SecretFilter([api_key]))
    if (
        args.max_body_mb <= 0
        or settings.max_batch < 1
        or settings.batch_wait_ms < 0
        or settings.shutdown_grace_s < 0
        or args.frame_cache_size < 0
        or args.max_queue < 1
        or args.request_timeout_s <= 0
        or args.max_frame_pixels < 1
        or args.max_request_pixels < 1
        or args.decode_workers < 1
    ):
        print(
            "error: --max_body_mb and --request_timeout_s must be > 0, --max_batch, --max_queue, --max_frame_pixels, "
            "--max_request_pixels and --decode_workers >= 1, --frame_cache_size, --batch_wait_ms and "
            "--shutdown_grace_s >= 0",
            file=sys.stderr,
        )
        return 2
    if not _is_loopback(settings.host) and not api_key:
        log.warning("binding %s without --api_key_env: anyone who can reach this port can use the model", settings.host)
    try:
        backend_name = choose_backend(settings.model_path, args.backend)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # Heavy imports (torch, transformers, fastapi) only once the flags are known to be good.
    from ..modeling import ModelLoadError
    from .app import ServerConfig, create_app

    log.info(
        "loading %s (%s backend)%s",
        settings.model_path,
        backend_name,
        f" + adapter {args.adapter_path}" if args.adapter_path else "",
    )
    from ..distributed import precision_for

    try:
        backend = load_backend(
            settings.model_path,
            args.adapter_path,
            backend=backend_name,
            default_frame_layout=settings.frame_layout,
            precision=precision_for(settings.mixed_precision)[0],  # same resolution as training
            max_seq_length=settings.max_seq_length,
            token=settings.hub_token,
            version=args.model_version,
        )
    except (ModelLoadError, BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if backend.adapter_path:
        log.info("LoRA adapter %s on its base model %s", backend.adapter_path, backend.base_model)
    if backend.frame_layout != settings.frame_layout:
        log.info(
            "frame layout %r from the model's folder (FRAME_LAYOUT says %r)",
            backend.frame_layout,
            settings.frame_layout,
        )
    config = ServerConfig(
        api_key=api_key,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        frame_cache_size=args.frame_cache_size,
        max_batch=settings.max_batch,
        batch_wait_ms=settings.batch_wait_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout_s,
        shutdown_grace_s=settings.shutdown_grace_s,
        max_frame_pixels=args.max_frame_pixels,
        max_request_pixels=args.max_request_pixels,
        decode_workers=args.decode_workers,
        warmup=not args.no_warmup,
    )
    app = create_app(backend, config)

    import uvicorn

    # log_config=None: uvicorn's loggers go through our root handler, which redacts secrets.
    server = _draining_server_class()(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            log_level=args.log_level,
            timeout_graceful_shutdown=CLOSE_TIMEOUT_S,
            server_header=False,
        ),
        drain=app.state.drain,
    )
    server.run()
    if server.drained:
        # Every request has had its answer. Leave now: interpreter teardown (garbage-collecting the
        # model: measured 28 s on a loaded 2-core machine; and an abort if a cancelled batch is still
        # on the model thread) would overrun the grace period, and nothing needs it.
        if app.state.worker.alive:
            log.info("exiting with a cancelled batch still on the model thread")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that the first SIGTERM/SIGINT starts the app's drain (new requests 503 at
        once, queued ones finish or get 503 within the grace period) while the port stays open, and
        uvicorn shuts down only after it. A second signal exits at once."""

        def __init__(self, config, drain):
            super().__init__(config)
            self._drain = drain
            self._loop = None
            self._draining = False
            self.drained = False  # the drain ran to its end: every model request has had its answer

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            if self._draining or not self.started or self._loop is None:
                if self._draining:
                    self.force_exit = True
                return super().handle_exit(sig, frame)
            self._draining = True
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))

        async def _drain_then_exit(self):
            try:
                await self._drain()
                self.drained = True
            finally:
                self.should_exit = True

    return DrainingServer
