"""Envoy SDS resources from what the sidecar holds, with the resource names SPIRE uses:

    default                 the caller's default identity (the first of attestation's
                            ordered list) as a tls_certificate
    spiffe://td/path        that identity, if the caller is entitled to it
    ROOTCA, ALL,            the trust bundle as a validation_context (trusted_ca); meshtls
    spiffe://td             has one trust domain, so all three name the same roots

A name that the caller may not have, or that names nothing, is left out of the answer;
the SotW protocol has no per-resource error, so `unavailable` lists them for the log.
The version of an answer is a digest of its resources: it changes exactly when what Envoy
would load changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2  # type: ignore[import-untyped]
from envoy.extensions.transport_sockets.tls.v3 import (  # type: ignore[import-untyped]
    common_pb2,
    secret_pb2,
)
from google.protobuf import any_pb2
from google.protobuf.message import Message

from sidecar.identity.model import TrustBundle, WorkloadIdentity

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105
DEFAULT_NAME = "default"
BUNDLE_NAMES = ("ROOTCA", "ALL")


@dataclass(frozen=True)
class Resolved:
    """The answer to a set of resource names for one caller."""

    secrets: tuple[Message, ...]  # envoy.extensions.transport_sockets.tls.v3.Secret
    unavailable: tuple[str, ...]
    serials: tuple[str, ...]  # of the certificates included, for the log

    @property
    def version(self) -> str:
        digest = hashlib.sha256()
        for secret in self.secrets:
            digest.update(secret.SerializeToString(deterministic=True))
        return digest.hexdigest()[:16]

    def packed(self) -> list[any_pb2.Any]:
        out = []
        for secret in self.secrets:
            item = any_pb2.Any()
            item.Pack(secret)
            out.append(item)
        return out


def tls_certificate(name: str, ident: WorkloadIdentity) -> Message:
    secret: Message = secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=ident.svid.chain_pem()),
            private_key=base_pb2.DataSource(inline_bytes=ident.svid.key_pem()),
        ),
    )
    return secret


def validation_context(name: str, bundle: TrustBundle) -> Message:
    secret: Message = secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle.pem())
        ),
    )
    return secret


def resolve(
    names: Sequence[str], idents: Sequence[WorkloadIdentity], bundle: TrustBundle
) -> Resolved:
    """Secrets for `names` out of the caller's identities (default first) and the bundle."""
    by_id = {str(i.svid.spiffe_id): i for i in idents}
    bundle_names = {*BUNDLE_NAMES, f"spiffe://{bundle.trust_domain}"}
    secrets: list[Message] = []
    unavailable: list[str] = []
    serials: list[str] = []
    for name in dict.fromkeys(names):
        ident = idents[0] if name == DEFAULT_NAME and idents else by_id.get(name)
        if ident is not None:
            secrets.append(tls_certificate(name, ident))
            serials.append(ident.svid.serial)
        elif name in bundle_names:
            secrets.append(validation_context(name, bundle))
        else:
            unavailable.append(name)
    return Resolved(tuple(secrets), tuple(unavailable), tuple(serials))
