"""Emulator of TabbyAPI's HTTP API for hosts without a GPU; started like TabbyAPI: `python main.py`.

Start-up order is TabbyAPI's, because deployment code depends on it:
1. port check: if network.port is taken on localhost, silently move to port+1. When both are
   taken TabbyAPI logs an error and returns from its entrypoint: exit status 0, which systemd's
   Restart=on-failure does not restart. This is what bites operators when a crashed instance
   still holds the port.
2. load the startup model (model_dir/model_name); a missing path or failed load exits 1.
3. read api_tokens.yml, or write one with fresh api_key/admin_key when absent (main: poll it
   every 2 s).
4. only now open the HTTP port.
The generation (exl2-checkpoint or main) is picked by tabby_emu/generation.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import socket
import sys

import yaml
from aiohttp import web
from tabby_emu.auth import AuthStore
from tabby_emu.config import ConfigError, EmuConfig
from tabby_emu.container import LoadError, ModelManager
from tabby_emu.generation import pick_generation
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
        log.error(
            "Ports %s and %s are in use by different services.\n"
            "Please free up those ports or specify a different one.\nExiting.",
            port,
            fallback,
        )
        return None
    log.warning("Port %s is currently in use. Switching to %s.", port, fallback)
    return fallback


async def serve(cfg: EmuConfig) -> int:
    port = choose_port(cfg.port)
    if port is None:
        return 0
    models = ModelManager(cfg.generation, cfg.model_defaults, cfg.draft_model_defaults)
    if cfg.model_name:
        # main.py: config.model and config.draft_model, all set values, go to the loader.
        model_path = (pathlib.Path(cfg.model_dir) / cfg.model_name).resolve()
        kwargs = {**{k: v for k, v in cfg.model.items() if v is not None}, "draft_model": dict(cfg.draft_model)}
        try:
            log.info("Loading startup model %s", model_path)
            await models.load(model_path, kwargs)
        except LoadError as exc:
            log.error("Startup model load failed: %s", exc)
            return 1
    auth = AuthStore(pathlib.Path("api_tokens.yml"), cfg.disable_auth, cfg.generation.api_key_list)
    try:
        auth.load_or_create()
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.error("api_tokens.yml: %s", exc)
        return 1
    watcher = None
    if cfg.generation.reload_tokens and not cfg.disable_auth:
        watcher = asyncio.create_task(auth.watch())

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
    logging.basicConfig(
        level=os.environ.get("TABBY_EMU_LOG_LEVEL", "INFO"), format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    try:
        generation = pick_generation()
        log.info("Emulating TabbyAPI generation %s", generation.name)
        cfg = EmuConfig.load(generation, argv)
    except (ConfigError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    return asyncio.run(serve(cfg))


if __name__ == "__main__":
    sys.exit(main())
