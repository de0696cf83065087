"""The server's life: listen, load in the engine thread, serve, and drain on SIGTERM/SIGINT.

    start      listen at once (/health answers 503 "loading"), the engine thread loads the model
    ready      /health 200; requests are admitted
    SIGTERM    drain: admission stops (503), running requests get ``shutdown_timeout`` seconds
               to finish, the rest are aborted (their streams end with finish_reason "abort"),
               handlers write their last bytes, the listener closes, exit status 0
    2nd signal skip the wait: abort at once
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from specserve.config import EngineConfig, ServerConfig
from specserve.errors import SpecserveError
from specserve.server.app import OpenAIServer
from specserve.server.async_engine import AsyncEngine
from specserve.server.metrics import ServerMetrics

HANDLER_GRACE_S = 10.0  # after the engine is idle: time for handlers to write their last chunks


async def run_server(config: ServerConfig, engine_config: EngineConfig) -> int:
    log = logging.getLogger("specserve.server")
    loop = asyncio.get_running_loop()
    metrics = ServerMetrics()
    engine = AsyncEngine(engine_config, metrics, config.max_queued_requests, freeze_heap=True)
    app = OpenAIServer(config, engine, metrics).build_app()
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=HANDLER_GRACE_S)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SpecserveError(
            f"cannot listen on {config.host}:{config.port} ({exc.strerror}): pick another --host or --port"
        ) from None
    log.info("listening on http://%s:%d, loading the model", config.host, config.port)

    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            hurry.set()
        stop.set()
        log.info("got %s: draining", signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    engine.start()
    try:
        stop_wait = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stop_wait, engine.loaded}, return_when=asyncio.FIRST_COMPLETED)
        if engine.loaded.done() and engine.loaded.exception() is not None and not stop.is_set():
            stop_wait.cancel()
            raise engine.loaded.exception()
        if engine.info is not None:
            log.info("ready: serving %s as %r", engine.info.model_name,
                     config.served_model_name or engine.info.model_name)
        await stop_wait
        await drain(engine, config.shutdown_timeout, hurry, log)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if engine.info is not None:
            await engine.stop()
        elif engine.loaded.done() and not engine.loaded.cancelled():
            engine.loaded.exception()  # a load that failed during the drain: already reported
        await runner.cleanup()
    log.info("stopped")
    return 0


async def drain(engine: AsyncEngine, timeout: float, hurry: asyncio.Event, log: logging.Logger) -> None:
    """Stop admission, let running requests finish for ``timeout`` seconds, abort the rest."""
    engine.begin_drain()
    if engine.num_reserved:
        log.info("waiting up to %.1f s for %d running requests", timeout, engine.num_reserved)
        hurried = asyncio.ensure_future(hurry.wait())
        idle = asyncio.ensure_future(engine.wait_idle(timeout))
        await asyncio.wait({hurried, idle}, return_when=asyncio.FIRST_COMPLETED)
        hurried.cancel()
        if not (idle.done() and idle.result()):
            idle.cancel()
            log.info("aborting %d unfinished requests", engine.num_reserved)
            engine.abort_all()
            await engine.wait_idle(HANDLER_GRACE_S)
