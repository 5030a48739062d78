"""``llmstack-router --config FILE [--check]``."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import signal
import sys

from aiohttp import web

from . import __version__
from .app import create_app
from .config import ConfigError, load_config
from .control import kill_all_spawned
from .logs import setup_logging
from .reload import reload_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmstack-router", description=__doc__)
    parser.add_argument("--config", default="/etc/llmstack/router/config.yml", help="YAML config file")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--version", action="version", version=__version__)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"config ok: {len(config.models)} models in {len(config.groups)} groups")
        return 0
    setup_logging(config.log_level)
    atexit.register(kill_all_spawned)
    logging.getLogger("llmstack_router").info("listening on %s:%d", config.host, config.port)
    # handler_cancellation: a client that disconnects cancels its handler, which is what
    # drops it from the queue or closes its upstream request.
    app = create_app(config)

    async def reload_on_sighup(app: web.Application) -> None:
        # Without this handler SIGHUP's default action kills the router.
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload_config, app, args.config)

    app.on_startup.append(reload_on_sighup)
    web.run_app(app, host=config.host, port=config.port, access_log=None,
                handler_cancellation=True, print=None, shutdown_timeout=5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
