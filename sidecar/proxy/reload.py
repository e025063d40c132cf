"""SIGHUP: re-read the sidecar's config file and apply its `inbound`/`outbound` sections.

An invalid file, or listeners that cannot be applied (an address in use), are logged and
rejected: the running listeners stay as they are. The other sections (CA, files, status,
renewal, local APIs) are not reloaded; when they changed, the log says that a restart is
needed to apply them.
"""

from __future__ import annotations

import dataclasses
import logging

from sidecar.config import SidecarConfig, load_config
from sidecar.errors import ConfigError
from sidecar.proxy.config import ProxyConfig
from sidecar.proxy.service import ProxyService, ReloadError

log = logging.getLogger("sidecar.proxy")


def _without_proxy(config: SidecarConfig) -> SidecarConfig:
    return dataclasses.replace(config, inbound=(), outbound=(), source=None)


async def reload_proxy(running: SidecarConfig, service: ProxyService) -> bool:
    """Reload the proxy listeners from `running.source`; True when applied."""
    if running.source is None:
        log.info("no config file to reload (the sidecar was started without one)")
        return False
    try:
        new = load_config(running.source)
    except ConfigError as exc:
        log.error(
            "config reload rejected; the running configuration stays: %s",
            exc,
            extra={"config": str(running.source)},
        )
        return False
    try:
        await service.reload(ProxyConfig(new.inbound, new.outbound))
    except ReloadError as exc:
        log.error(
            "config reload rejected; the running listeners stay: %s",
            exc,
            extra={"config": str(running.source)},
        )
        return False
    if _without_proxy(new) != _without_proxy(running):
        changed = [
            f.name
            for f in dataclasses.fields(new)
            if f.name not in {"inbound", "outbound", "source"}
            and getattr(new, f.name) != getattr(running, f.name)
        ]
        log.warning(
            "config reload applied the proxy listeners only; restart the sidecar to apply "
            "changes to: %s",
            ", ".join(changed),
            extra={"config": str(running.source), "changed": changed},
        )
    return True
