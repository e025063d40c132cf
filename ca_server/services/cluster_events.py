"""Trust-state changes pushed between CA replicas on PostgreSQL.

A dedicated autocommit psycopg connection LISTENs on `meshtls_trust`; every replica's
change of authorities or revocations NOTIFYs there when it commits
(`ca_server.db.notify`). Each notification hands the announced bundle version to
`on_change`, which makes the AuthorityManager reload at once instead of at its next poll.

Notifications sent while the connection is down are lost, so after every (re)connect
`on_change(None)` asks for a check. A lost connection is retried with exponential backoff
and jitter; a silent one is caught by a ping every `ping_interval` seconds (and TCP
keepalives). The poll keeps running beside this, so nothing depends on the listener alone.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from ca_server.db.notify import TRUST_CHANNEL, listen_connect_kwargs, parse_payload
from ca_server.db.session import scrub_secrets
from meshtls.identity.rotation import Backoff

log = logging.getLogger(__name__)


class TrustChangeListener:
    def __init__(
        self,
        database_url: str,
        on_change: Callable[[int | None], None],
        *,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        ping_interval: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self._connect_kwargs: dict[str, Any] = listen_connect_kwargs(database_url)
        self._on_change = on_change
        self._backoff = Backoff(backoff_initial, backoff_max, rng=rng)
        self._ping_interval = ping_interval
        self.connected = False
        self.connects = 0  # successful (re)connections, for status and tests
        self.received = 0  # notifications received

    async def run(self) -> None:
        """Listen until cancelled, reconnecting whenever the connection is lost."""
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as exc:
                delay = self._backoff.next_delay()
                text = scrub_secrets(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                log.warning(
                    "trust change listener lost its database connection; polling covers "
                    "the gap until it reconnects",
                    extra={
                        "error": text or type(exc).__name__,
                        "retry_in_seconds": round(delay, 3),
                        "attempt": self._backoff.attempts,
                    },
                )
                self.connected = False
                await asyncio.sleep(delay)

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(autocommit=True, **self._connect_kwargs)
        async with conn:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(TRUST_CHANNEL)))
            self.connected = True
            self.connects += 1
            if self._backoff.attempts:
                log.info("trust change listener reconnected", extra={"connects": self.connects})
            self._backoff.reset()
            self._on_change(None)  # whatever was announced while nobody listened
            while True:
                async for notice in conn.notifies(timeout=self._ping_interval):
                    if notice.channel == TRUST_CHANNEL:
                        self.received += 1
                        self._on_change(parse_payload(notice.payload))
                await conn.execute("SELECT 1")  # a dead connection fails here
