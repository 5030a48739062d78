"""Emulator of TabbyAPI's HTTP API for hosts without a GPU; started like TabbyAPI: `python main.py`.

Start-up order is TabbyAPI's, because deployment code depends on it:
1. port check: if network.port is taken on localhost, silently move to port+1 (exit 1 when both
   are taken). This is what bites operators when a crashed instance still holds the port.
2. load the startup model (model_dir/model_name); a missing path or failed load exits 1.
3. read api_tokens.yml, or write one with fresh api_key/admin_key when absent; poll it every 2 s.
4. only now open the HTTP port.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import signal
import socket
import sys

from aiohttp import web
from tabby_emu.auth import AuthStore
from tabby_emu.config import EmuConfig
from tabby_emu.container import LoadError, ModelManager
from tabby_emu.server import build_app

log = logging.getLogger("tabby_emu")


def is_port_in_use(port: int) -> bool:
    # TabbyAPI probes localhost whatever host it binds, so the emulator does too.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex(("localhost", port)) == 0


def choose_port(port: int) -> int | None:
    if not is_port_in_use(port):
        return port
    fallback = port + 1
    if is_port_in_use(fallback):
        log.error("Ports %s and %s are in use by different services. Exiting.", port, fallback)
        return None
    log.warning("Port %s is currently in use. Switching to %s.", port, fallback)
    return fallback


async def serve(cfg: EmuConfig) -> int:
    port = choose_port(cfg.port)
    if port is None:
        return 1
    models = ModelManager()
    if cfg.model_name:
        model_path = pathlib.Path(cfg.model_dir) / cfg.model_name
        draft_path = None
        if cfg.draft_model_name:
            draft_path = pathlib.Path(cfg.draft_model_dir) / cfg.draft_model_name
        try:
            if not model_path.exists():
                raise LoadError(f"Model path {model_path} does not exist (model_dir + model_name)")
            log.info("Loading startup model %s", model_path)
            await models.load(model_path.resolve(), cfg.load_args, draft_path, cfg.draft_args)
        except LoadError as exc:
            log.error("Startup model load failed: %s", exc)
            return 1
    auth = AuthStore(pathlib.Path("api_tokens.yml"), cfg.disable_auth)
    auth.load_or_create()
    watcher = None if cfg.disable_auth else asyncio.create_task(auth.watch())

    runner = web.AppRunner(build_app(cfg, models, auth), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, cfg.host, port).start()
    log.info("Uvicorn running on http://%s:%s", cfg.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("Shutting down")
    if watcher:
        watcher.cancel()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yml", help="config file (default: ./config.yml)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    try:
        cfg = EmuConfig.from_file(pathlib.Path(args.config))
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
