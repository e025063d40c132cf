"""The admin commands of `meshtls-ca` (token, entry, cert, node, authority, bundle, status):
each turns its arguments into one AdminService call and prints the answer for a human, or
as JSON with --json."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from meshtls.durations import parse_duration
from meshtls.v1 import admin_pb2, admin_pb2_grpc, types_pb2

DEFAULT_DATA_DIR = Path(".meshtls/ca")
TIMEOUT = 30.0


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass
class AdminClient:
    stub: admin_pb2_grpc.AdminServiceStub

    @classmethod
    @contextmanager
    def connect(cls, args: argparse.Namespace) -> Iterator[AdminClient]:
        socket = args.admin_socket
        if socket is None:
            data_dir = args.data_dir or Path(
                os.environ.get("MESHTLS_CA_DATA_DIR", DEFAULT_DATA_DIR)
            )
            socket = data_dir / "admin.sock"
        if not socket.exists():
            raise OSError(
                f"no admin socket at {socket}: is `meshtls-ca serve` running with this data dir? "
                "(pass --data-dir or --admin-socket)"
            )
        with grpc.insecure_channel(f"unix://{socket.resolve()}") as channel:
            yield cls(admin_pb2_grpc.AdminServiceStub(channel))


def _time(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return stamp.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _json(message: Message | list[Message]) -> None:
    if isinstance(message, list):
        data: Any = [MessageToDict(m, preserving_proto_field_name=True) for m in message]
    else:
        data = MessageToDict(message, preserving_proto_field_name=True)
    print(json.dumps(data, indent=2))


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _pages(fetch: Callable[[str], Any], field: str) -> list[Any]:
    items: list[Any] = []
    token = ""
    while True:
        page = fetch(token)
        items.extend(getattr(page, field))
        token = page.next_page_token
        if not token:
            return items


def _connection_flags() -> argparse.ArgumentParser:
    """How an admin command finds the server; accepted after the action, where people type
    them (`meshtls-ca entry list --data-dir DIR`)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--data-dir", type=Path, help="the CA's data dir (finds admin.sock)")
    flags.add_argument("--admin-socket", type=Path, help="path of the admin Unix socket")
    return flags


class _WithConnectionFlags:
    """A subparsers action whose every action parser also takes the connection flags."""

    def __init__(self, actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        self._actions = actions

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._actions.add_parser(
            name, parents=[_connection_flags()], **kwargs
        )
        return parser


@dataclass
class Command:
    help: str
    build: Callable[[Any], None]
    execute: Callable[[AdminClient, argparse.Namespace], int]
    # A flat command takes its options directly (`meshtls-ca status --json`); the others
    # have actions (`meshtls-ca entry list`).
    flat: bool = False

    def register(self, sub: argparse._SubParsersAction, name: str) -> None:  # type: ignore[type-arg]
        if self.flat:
            self.build(sub.add_parser(name, help=self.help, parents=[_connection_flags()]))
        else:
            parser = sub.add_parser(name, help=self.help)
            self.build(
                _WithConnectionFlags(
                    parser.add_subparsers(dest="action", required=True, metavar="ACTION")
                )
            )

    def run(self, client: AdminClient, args: argparse.Namespace) -> int:
        return self.execute(client, args)


# token -------------------------------------------------------------------------------------


def _build_token(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    create = actions.add_parser("create", help="create a one-time join token (printed once)")
    create.add_argument("--node", required=True, help="node name the token enrolls")
    create.add_argument("--ttl", type=_duration, default=None, help="lifetime, e.g. 10m (default)")


def _run_token(client: AdminClient, args: argparse.Namespace) -> int:
    answer = client.stub.CreateJoinToken(
        admin_pb2.CreateJoinTokenRequest(node_name=args.node, ttl_seconds=int(args.ttl or 0)),
        timeout=TIMEOUT,
    )
    print(answer.token)
    print(
        f"token for node {answer.node_name}, single use, expires {_time(answer.expires_at)}",
        file=sys.stderr,
    )
    return 0


# entry -------------------------------------------------------------------------------------


def _build_entry(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    create = actions.add_parser("create", help="register an identity for a node")
    create.add_argument("--spiffe-id", required=True)
    create.add_argument("--node", required=True)
    create.add_argument("--dns", action="append", default=[], help="DNS SAN (repeatable)")
    create.add_argument("--ttl", type=_duration, default=None, help="certificate lifetime (1h)")
    create.add_argument(
        "--selector",
        action="append",
        default=[],
        help="workload selector, e.g. unix:uid:1000 (repeatable)",
    )
    create.add_argument("--json", action="store_true")
    listing = actions.add_parser("list", help="list registration entries")
    listing.add_argument("--node")
    listing.add_argument("--spiffe-id")
    listing.add_argument("--json", action="store_true")
    delete = actions.add_parser("delete", help="delete a registration entry")
    delete.add_argument("id")


def _entry_rows(entries: list[types_pb2.RegistrationEntry]) -> None:
    _table(
        ["id", "spiffe id", "node", "ttl", "dns"],
        [
            [e.id, e.spiffe_id, e.node_name, f"{e.ttl_seconds}s", ",".join(e.dns_names) or "-"]
            for e in entries
        ],
    )


def _run_entry(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "create":
        entry = client.stub.CreateEntry(
            admin_pb2.CreateEntryRequest(
                spiffe_id=args.spiffe_id,
                node_name=args.node,
                dns_names=args.dns,
                ttl_seconds=int(args.ttl or 0),
                selectors=args.selector,
            ),
            timeout=TIMEOUT,
        )
        _json(entry) if args.json else _entry_rows([entry])
    elif args.action == "list":
        entries = _pages(
            lambda token: client.stub.ListEntries(
                admin_pb2.ListEntriesRequest(
                    node_name=args.node or "", spiffe_id=args.spiffe_id or "", page_token=token
                ),
                timeout=TIMEOUT,
            ),
            "entries",
        )
        _json(entries) if args.json else _entry_rows(entries)
    else:
        client.stub.DeleteEntry(admin_pb2.DeleteEntryRequest(id=args.id), timeout=TIMEOUT)
        print(f"deleted entry {args.id}")
    return 0


# cert --------------------------------------------------------------------------------------


def _build_cert(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    listing = actions.add_parser("list", help="list issued certificates")
    listing.add_argument("--node")
    listing.add_argument("--spiffe-id")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="show one certificate (with its PEM)")
    show.add_argument("serial")
    show.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="revoke a certificate")
    revoke.add_argument("serial")
    revoke.add_argument("--reason", default="")


def _run_cert(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        certs = _pages(
            lambda token: client.stub.ListCertificates(
                admin_pb2.ListCertificatesRequest(
                    node_name=args.node or "", spiffe_id=args.spiffe_id or "", page_token=token
                ),
                timeout=TIMEOUT,
            ),
            "certificates",
        )
        if args.json:
            _json(certs)
        else:
            _table(
                ["serial", "spiffe id", "node", "kind", "status", "not after"],
                [
                    [
                        c.serial,
                        c.spiffe_id,
                        c.node_name or "-",
                        c.kind,
                        c.status,
                        _time(c.not_after),
                    ]
                    for c in certs
                ],
            )
    elif args.action == "show":
        cert = client.stub.GetCertificate(
            admin_pb2.GetCertificateRequest(serial=args.serial), timeout=TIMEOUT
        )
        if args.json:
            _json(cert)
        else:
            for label, value in (
                ("serial", cert.serial),
                ("spiffe id", cert.spiffe_id),
                ("node", cert.node_name or "-"),
                ("kind", cert.kind),
                ("status", cert.status),
                ("not before", _time(cert.not_before)),
                ("not after", _time(cert.not_after)),
                ("sha256", cert.fingerprint_sha256),
                ("issuer sha256", cert.issuer_fingerprint_sha256),
            ):
                print(f"{label + ':':<15}{value}")
            if cert.revocation_reason:
                print(f"{'revoked:':<15}{_time(cert.revoked_at)} ({cert.revocation_reason})")
            print(cert.pem, end="")
    else:
        cert = client.stub.RevokeCertificate(
            admin_pb2.RevokeCertificateRequest(serial=args.serial, reason=args.reason),
            timeout=TIMEOUT,
        )
        print(f"revoked {cert.serial} ({cert.spiffe_id}) at {_time(cert.revoked_at)}")
    return 0


# node --------------------------------------------------------------------------------------


def _build_node(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    listing = actions.add_parser("list", help="list enrolled nodes")
    listing.add_argument("--json", action="store_true")
    ban = actions.add_parser("ban", help="ban a node: revoke its certificates, refuse its calls")
    ban.add_argument("name")
    ban.add_argument("--reason", default="")


def _run_node(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        found = _pages(
            lambda token: client.stub.ListNodes(
                admin_pb2.ListNodesRequest(page_token=token), timeout=TIMEOUT
            ),
            "nodes",
        )
        if args.json:
            _json(found)
        else:
            _table(
                ["name", "status", "serial", "cert expires", "last seen"],
                [
                    [
                        n.name,
                        n.status,
                        n.current_serial or "-",
                        _time(n.certificate_expires_at),
                        _time(n.last_seen_at),
                    ]
                    for n in found
                ],
            )
    else:
        node = client.stub.BanNode(
            admin_pb2.BanNodeRequest(name=args.name, reason=args.reason), timeout=TIMEOUT
        )
        print(f"banned node {node.name}; its certificates are revoked")
    return 0


# authority, bundle, status -----------------------------------------------------------------


def _build_authority(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    listing = actions.add_parser("list", help="list CA certificates (roots and intermediates)")
    listing.add_argument("--json", action="store_true")
    rotate = actions.add_parser(
        "rotate",
        help="prepare and publish the next authority now; activate it once it has propagated",
    )
    rotate.add_argument(
        "--force",
        action="store_true",
        help="activate at once, before every peer may have the new trust bundle",
    )
    imported = actions.add_parser(
        "import",
        help="upstream mode: add a new intermediate from your PKI; it becomes the signer "
        "once valid, propagated and outliving the active one",
    )
    imported.add_argument("--cert", type=Path, required=True, help="intermediate (PEM)")
    imported.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    imported.add_argument(
        "--chain", type=Path, help="certificates above it up to the root (PEM), if new"
    )
    imported.add_argument("--json", action="store_true")


def _authority_rows(authorities: list[admin_pb2.AuthorityRecord]) -> None:
    _table(
        ["id", "kind", "state", "upstream", "not after", "sha256"],
        [
            [
                a.id,
                a.kind,
                a.state,
                "yes" if a.upstream else "no",
                _time(a.not_after),
                a.fingerprint_sha256[:16],
            ]
            for a in authorities
        ],
    )


def _read_input(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def _import_authority(client: AdminClient, args: argparse.Namespace) -> int:
    request = admin_pb2.ImportAuthorityRequest(
        certificate_pem=_read_input(args.cert, "certificate file"),
        private_key_pem=_read_input(args.key, "key file"),
        chain_pem=_read_input(args.chain, "chain file") if args.chain else b"",
    )
    done = client.stub.ImportAuthority(request, timeout=TIMEOUT)
    if args.json:
        _json(done)
        return 0
    print(f"imported intermediate {done.imported.id} ({done.imported.subject})")
    if done.HasField("new_root"):
        print(f"new root {done.new_root.id} published in the trust bundle")
    if done.HasField("activates_at"):
        print(f"it becomes the signer at {_time(done.activates_at)}")
    else:
        print("it is the signer now")
    _authority_rows(list(done.authorities))
    return 0


def _run_authority(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "import":
        return _import_authority(client, args)
    if args.action == "rotate":
        if args.force:
            print(
                "WARNING: activating at once; sidecars that have not fetched the new trust "
                "bundle yet may refuse certificates signed by it",
                file=sys.stderr,
            )
        done = client.stub.RotateAuthority(
            admin_pb2.RotateAuthorityRequest(immediate=args.force), timeout=TIMEOUT
        )
        for action in done.actions or ["nothing to do: a prepared authority is waiting"]:
            print(action)
        if done.HasField("activates_at"):
            print(f"the prepared authority activates at {_time(done.activates_at)}")
        _authority_rows(list(done.authorities))
        return 0
    answer = client.stub.ListAuthorities(admin_pb2.ListAuthoritiesRequest(), timeout=TIMEOUT)
    _json(list(answer.authorities)) if args.json else _authority_rows(list(answer.authorities))
    return 0


def _build_bundle(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    actions.add_parser("show", help="print the trust anchors (PEM) on stdout")


def _run_bundle(client: AdminClient, args: argparse.Namespace) -> int:
    bundle = client.stub.GetTrustBundle(types_pb2.GetTrustBundleRequest(), timeout=TIMEOUT)
    for der in bundle.root_certificates:
        sys.stdout.write(x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode())
    return 0


def _build_crl(actions: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    show = actions.add_parser("show", help="print the current CRL (PEM by default)")
    form = show.add_mutually_exclusive_group()
    form.add_argument("--pem", action="store_true", help="PEM (default)")
    form.add_argument("--der", action="store_true", help="raw DER bytes on stdout")


def _run_crl(client: AdminClient, args: argparse.Namespace) -> int:
    crl = client.stub.GetCrl(types_pb2.GetCrlRequest(), timeout=TIMEOUT)
    if args.der:
        sys.stdout.buffer.write(crl.der)
    else:
        parsed = x509.load_der_x509_crl(crl.der)
        sys.stdout.write(parsed.public_bytes(Encoding.PEM).decode())
        print(f"CRL number {crl.number}, next update {_time(crl.next_update)}", file=sys.stderr)
    return 0


def _build_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")


def _run_status(client: AdminClient, args: argparse.Namespace) -> int:
    status = client.stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=TIMEOUT)
    if args.json:
        _json(status)
        return 0
    print(f"trust domain:   {status.trust_domain}")
    print(f"version:        {status.version} (up since {_time(status.started_at)})")
    print(f"agent:          {status.agent_address} (mTLS)")
    print(f"enrollment:     {status.enrollment_address} (TLS)")
    print(f"database:       {status.database}")
    print(f"bundle version: {status.bundle_version}")
    print(
        f"nodes: {status.nodes}  entries: {status.entries}  "
        f"certificates valid: {status.certificates_valid}  revoked: {status.certificates_revoked}"
    )
    print()
    _authority_rows(list(status.authorities))
    for warning in status.warnings:
        print(f"WARNING: {warning}")
    return 0


COMMANDS: dict[str, Command] = {
    "token": Command("join tokens", _build_token, _run_token),
    "entry": Command("registration entries", _build_entry, _run_entry),
    "cert": Command("issued certificates", _build_cert, _run_cert),
    "node": Command("enrolled nodes", _build_node, _run_node),
    "authority": Command("signing authorities", _build_authority, _run_authority),
    "bundle": Command("trust bundle", _build_bundle, _run_bundle),
    "crl": Command("certificate revocation list", _build_crl, _run_crl),
    "status": Command("the CA at a glance", _build_status, _run_status, flat=True),
}
