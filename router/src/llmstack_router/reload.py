"""``SIGHUP``: reload the config in place, without dropping a request in flight.

Validated first: a file that does not load keeps the old config and logs why. What can change live
is what no request holds: the keys, the log level and every group's scheduling settings (queue,
residency, TTL, deadlines). Backends and models are what requests are bound to (lanes, upstream
pools, units); a change there keeps the old config too and says to restart the router.
"""

from __future__ import annotations

import logging

from aiohttp import web

from .config import ConfigError, RouterConfig, load_config
from .middleware import Keys

log = logging.getLogger("llmstack_router.reload")
KEYS = web.AppKey("keys", Keys)


def reload_config(app: web.Application, path: str) -> bool:
    from .app import ROUTER_KEY  # app imports this module's KEYS

    router = app[ROUTER_KEY]
    old: RouterConfig = router.config
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("reload refused, keeping the running config: %s: %s", path, exc)
        return False
    if new.backends != old.backends or new.models != old.models or new.names != old.names \
            or set(new.groups) != set(old.groups) or (new.host, new.port) != (old.host, old.port) \
            or new.limits != old.limits:
        log.error("reload refused, keeping the running config: %s changes backends, models, groups, limits or "
                  "the listen address, which requests, lanes and the listener are bound to; restart the router "
                  "instead", path)
        return False
    keys = app[KEYS]
    fresh = Keys(new.auth)
    keys.allow_unauthenticated, keys.api, keys.admin = fresh.allow_unauthenticated, fresh.api, fresh.admin
    logging.getLogger().setLevel(new.log_level)
    for lane in router.lanes:
        lane.reconfigure(new.groups[lane.group.name])
    router.config = new
    log.info("config reloaded from %s", path)
    return True
