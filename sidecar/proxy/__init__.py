"""The sidecar's data plane: a mutual-TLS proxy driven by the identity snapshots.

Inbound listeners take mutual TLS from remote sidecars and forward plaintext to a local
app; outbound listeners take plaintext from a local app and open mutual TLS to a remote
sidecar. See docs/DATAPLANE.md for how it works and the configuration reference.
"""
