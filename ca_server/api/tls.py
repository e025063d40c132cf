"""Server TLS credentials that can change while the server runs.

gRPC asks `_fetch` at every new handshake; it returns a new configuration once after
`update()` and None (keep the current one) otherwise. Open connections keep the
certificate they were made with. The fetcher runs on a gRPC core thread, so it only swaps
a reference under a lock."""

from __future__ import annotations

import threading

import grpc


class ReloadableServerCredentials:
    def __init__(self, key_pem: bytes, chain_pem: bytes, *, client_roots_pem: bytes | None) -> None:
        """`client_roots_pem`: the roots a client certificate must chain to (mutual TLS,
        required); None for server-authenticated TLS only."""
        self._require_client_auth = client_roots_pem is not None
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._initial = self._config(key_pem, chain_pem, client_roots_pem)
        self.updates = 0

    def _config(
        self, key_pem: bytes, chain_pem: bytes, client_roots_pem: bytes | None
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, chain_pem)], root_certificates=client_roots_pem
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self._require_client_auth
        )

    def update(self, key_pem: bytes, chain_pem: bytes, client_roots_pem: bytes | None) -> None:
        """Serve this certificate (and, with mutual TLS, accept these client roots) on every
        handshake from now on."""
        if self._require_client_auth and client_roots_pem is None:
            raise ValueError("a mutual-TLS listener needs client roots")
        config = self._config(
            key_pem, chain_pem, client_roots_pem if self._require_client_auth else None
        )
        with self._lock:
            self._pending = config
            self.updates += 1

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            config, self._pending = self._pending, None
        return config
