"""``specserve serve``: the OpenAI-compatible HTTP server (flag names as in vLLM)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading

from specserve.cli.args import add_engine_args, engine_config_from_args
from specserve.config import ServerConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the OpenAI API over HTTP")
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--served-model-name", default=None,
                       help="the model name clients send (default: the loaded model's name)")
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer <key>' (except on /health and /metrics)")
    group.add_argument("--max-queued-requests", type=int, default=256,
                       help="sequences that may wait beyond --max-num-seqs running; more get 429")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds running requests get to finish after SIGTERM before they are aborted")
    group.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_engine_args(parser)
    parser.set_defaults(run=run)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        shutdown_timeout=args.shutdown_timeout,
    )


def run(args: argparse.Namespace) -> int:
    from specserve.server.async_engine import ENGINE_THREAD
    from specserve.server.runner import run_server

    server_config = server_config_from_args(args)
    engine_config = engine_config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    status = asyncio.run(run_server(server_config, engine_config))
    if any(t.name == ENGINE_THREAD and t.is_alive() for t in threading.enumerate()):
        # stopped while the model was still loading: the engine thread is inside native code, and
        # finalising the interpreter under it aborts the process (C++ terminate, status 134).
        # Nothing was admitted, so nothing is lost: leave without finalising.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status
