"""``llmstack-router --config FILE [--check]``."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import sys
from collections.abc import Callable

from . import __version__
from .app import run
from .config import ConfigError, load_config
from .control import kill_all_spawned
from .logs import setup_logging


def event_loop() -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """uvloop when it is installed (a dependency: it halves the loop's own cost per request), asyncio's
    otherwise or with LLMSTACK_ROUTER_EVENT_LOOP=asyncio (a way back should uvloop misbehave)."""
    if os.environ.get("LLMSTACK_ROUTER_EVENT_LOOP", "auto") == "asyncio":
        return "asyncio (LLMSTACK_ROUTER_EVENT_LOOP)", None
    try:
        import uvloop  # optional at run time: the router works without it
    except ImportError:
        return "asyncio (uvloop not installed)", None
    return f"uvloop {uvloop.__version__}", uvloop.new_event_loop


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
    loop_name, loop_factory = event_loop()
    logging.getLogger("llmstack_router").info("listening on %s:%d (event loop: %s)", config.host, config.port,
                                              loop_name)
    # app.py: web.run_app's loop plus the connection limit (limits.max_connections) and SIGHUP (reload.py).
    run(config, args.config, loop_factory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
