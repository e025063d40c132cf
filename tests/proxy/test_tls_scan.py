"""A TLS scan (sslscan, Debian package `sslscan`) of an inbound listener: no protocol
below the configured minimum, only AEAD suites, only elliptic-curve groups, and nothing
reaches the app. sslscan cannot list TLS 1.2 suites of a server that requires a client
certificate (its TLS 1.2 handshakes fail before it can tell); test_inbound_s_client.py
checks those with a client certificate. A missing sslscan fails the test under CI=true
and skips it elsewhere."""

from __future__ import annotations

import asyncio
import os
import re
import shutil

import pytest

from tests.proxy.helpers import API, WEB, App, Mesh, inbound, ping_pong, port_of


def require_sslscan() -> str:
    path = shutil.which("sslscan")
    if path is None:
        problem = "sslscan is not installed (apt-get install sslscan; scripts/system-deps.sh)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return path


async def scan(port: int) -> str:
    proc = await asyncio.create_subprocess_exec(
        require_sslscan(),
        "--no-colour",
        "--no-heartbleed",
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out.decode()


def protocols(report: str) -> dict[str, str]:
    return dict(re.findall(r"^(SSLv[23]|TLSv1\.[0-3])\s+(enabled|disabled)", report, re.M))


def accepted_ciphers(report: str) -> list[tuple[str, str]]:
    return re.findall(r"^(?:Preferred|Accepted)\s+(TLSv1\.[0-3])\s+\d+ bits\s+(\S+)", report, re.M)


def groups(report: str) -> list[str]:
    section = report.split("Server Key Exchange Group(s):", 1)[-1].split("\n\n", 1)[0]
    return re.findall(r"^TLSv1\.[23]\s+\d+ bits\s+(\S+)", section, re.M)


@pytest.mark.parametrize("minimum", ["1.3", "1.2"])
async def test_scan_shows_only_strong_protocols_and_suites(mesh: Mesh, minimum: str) -> None:
    require_sslscan()
    mesh.issue(WEB)
    app = await App(ping_pong).start()
    service = await mesh.serve(
        inbound=[inbound("web", app.address, [API], min_tls_version=minimum)]
    )
    report = await scan(port_of(service, "web"))
    found = protocols(report)
    assert found.get("TLSv1.3") == "enabled", report
    expected_12 = "enabled" if minimum == "1.2" else "disabled"
    assert found.get("TLSv1.2") == expected_12, report
    for old in ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1"):
        assert found.get(old, "disabled") == "disabled", report
    ciphers = accepted_ciphers(report)
    assert any(version == "TLSv1.3" for version, _ in ciphers), report
    for version, name in ciphers:
        if version == "TLSv1.2":
            assert name.startswith("ECDHE-"), name
            assert "GCM" in name or "CHACHA20" in name, name
        else:
            assert version == "TLSv1.3", (version, name)
            assert re.fullmatch(r"TLS_(AES_(128|256)_GCM|CHACHA20_POLY1305)_SHA(256|384)", name)
    found_groups = groups(report)
    assert found_groups, report
    assert all(not g.startswith("ffdhe") for g in found_groups), found_groups
    assert app.connections == []  # a scanner without a client certificate never gets through
