"""Mixed meshes: some hosts run Envoy fed over SDS, others the built-in proxy, and they talk
to each other in both directions.

- A real Envoy holding its SDS identity (spiffe://example.org/envoy/front) connects
  upstream to a meshtls inbound listener that allows exactly that identity; the app behind
  the inbound listener learns the caller from the PROXY v2 header.
- A meshtls outbound listener connects to a real Envoy terminating mTLS with its SDS
  identity, and requires exactly that identity from it; expecting any other is refused.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshtls.clock import ManualClock
from sidecar.proxy.config import ProxyConfig
from tests.proxy.helpers import App, answer_or_reset, exchange, http_whoami
from tests.sidecar.helpers import wait_for
from tests.workload.envoy import config as inbound_envoy_config
from tests.workload.envoy import running_envoy
from tests.workload.helpers import Env, me, serial_of, sidecar
from tests.workload.test_envoy import echo_app

pytestmark = pytest.mark.slow

ENVOY = "spiffe://example.org/envoy/front"
API = "spiffe://example.org/svc/api"
WEB = "spiffe://example.org/svc/web"


def outbound_envoy_config(
    *, sds_socket: str, identity: str, upstream_port: int, expect: str
) -> dict[str, Any]:
    """Envoy as a client-side proxy: plaintext listener on 127.0.0.1:0, tcp_proxy to a meshtls
    inbound listener with mutual TLS; its certificate and validation context over SDS."""
    document = inbound_envoy_config(
        sds_socket=sds_socket,  # type: ignore[arg-type]
        identity=identity,
        trust_domain="example.org",
        app_port=upstream_port,
    )
    resources = document["static_resources"]
    listener = resources["listeners"][0]
    chain = listener["filter_chains"][0]
    tls = chain.pop("transport_socket")["typed_config"]
    common = tls["common_tls_context"]
    # Envoy's client side offers at most TLS 1.2 unless told otherwise, and meshtls
    # listeners accept only TLS 1.3 by default (docs/DATAPLANE.md, "Mixed meshes").
    common["tls_params"] = {"tls_maximum_protocol_version": "TLSv1_3"}
    common["combined_validation_context"]["default_validation_context"] = {
        "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": expect}}]
    }
    upstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "common_tls_context": common,
        },
    }
    app_cluster = next(c for c in resources["clusters"] if c["name"] == "app")
    app_cluster["transport_socket"] = upstream_tls
    return document


async def http_get(port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_envoy_with_an_sds_identity_calls_a_meshtls_inbound_listener(env: Env) -> None:
    await env.entry(ENVOY, me())  # Envoy runs as this test's uid and fetches it over SDS
    await env.entry(API)  # the inbound listener's identity (the proxy needs no selectors)
    whoami = await App(http_whoami, proxy_protocol=True).start()
    inbound = {
        "name": "api",
        "listen": "127.0.0.1:0",
        "forward": whoami.address,
        "identity": API,
        "allow": [ENVOY],
        "proxy_protocol": True,
    }
    clock = ManualClock()
    try:
        async with sidecar(env.config(inbound=[inbound]), clock) as app:
            await wait_for(lambda: None not in (serial_of(app, ENVOY), serial_of(app, API)))
            bound = app.proxy.listeners["api"].bound
            assert bound is not None
            document = outbound_envoy_config(
                sds_socket=str(env.sds_socket), identity=ENVOY, upstream_port=bound.port,
                expect=API,
            )  # fmt: skip
            async with running_envoy(env.tmp_path / "envoy", document) as envoy:
                answers: list[bytes] = []

                async def answered() -> bool:
                    try:  # Envoy listens once its SDS secrets are warm
                        answers.append(await http_get(envoy.port))
                    except OSError:
                        return False
                    return answers[-1].startswith(b"HTTP/1.1 200")

                await wait_for(answered, within=30, what=f"envoy -> meshtls\n{envoy.log_tail()}")
                assert answers[-1].endswith(f"hello {ENVOY}\n".encode())
                accepted = app.metrics.registry.get_sample_value(
                    "meshtls_proxy_handshakes_total", {"listener": "api", "result": "accepted"}
                )
                assert accepted is not None
                assert accepted >= 1
    finally:
        await whoami.stop()


async def test_a_meshtls_outbound_listener_calls_envoy_and_checks_its_identity(env: Env) -> None:
    await env.entry(ENVOY, me())
    await env.entry(WEB)
    clock = ManualClock()
    async with echo_app() as app_port:
        document = inbound_envoy_config(
            sds_socket=env.sds_socket, identity=ENVOY, trust_domain="example.org", app_port=app_port
        )

        def outbound(name: str, port: int, expect: str) -> dict[str, Any]:
            return {
                "name": name,
                "listen": "127.0.0.1:0",
                "connect": f"127.0.0.1:{port}",
                "identity": WEB,
                "expect": expect,
            }

        # Envoy's port is known only once it runs, and Envoy needs the sidecar's SDS first:
        # the outbound listeners are added by a reload once Envoy listens.
        async with sidecar(env.config(), clock) as app:
            await wait_for(lambda: None not in (serial_of(app, ENVOY), serial_of(app, WEB)))
            async with running_envoy(env.tmp_path / "envoy", document) as envoy:
                good = outbound("to-envoy", envoy.port, ENVOY)
                wrong = outbound("to-envoy-wrong", envoy.port, API)
                listeners = env.config(outbound=[good, wrong])
                await app.proxy.reload(ProxyConfig(listeners.inbound, listeners.outbound))
                good_port = app.proxy.listeners["to-envoy"].bound
                wrong_port = app.proxy.listeners["to-envoy-wrong"].bound
                assert good_port is not None
                assert wrong_port is not None

                async def echoed() -> bool:
                    try:
                        return await exchange(good_port.port, b"ping") == b"app:ping"
                    except OSError:
                        return False

                await wait_for(echoed, within=30, what=f"meshtls -> envoy\n{envoy.log_tail()}")
                # Expecting another identity than Envoy's: the connection never reaches the app.
                assert await answer_or_reset(wrong_port.port, b"ping", within=5) in (None, b"")
                refused = app.metrics.registry.get_sample_value(
                    "meshtls_proxy_refused_total",
                    {"listener": "to-envoy-wrong", "reason": "unexpected_identity"},
                )
                assert refused is not None
                assert refused >= 1
