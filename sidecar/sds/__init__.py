"""Envoy Secret Discovery Service (SDS v3) on a Unix socket: Envoy fetches its certificate
(a tls_certificate) and the trust bundle (a validation_context) from the sidecar and gets
every rotation pushed. Same socket server and caller attestation as the Workload API
(`sidecar.workload_api`); resource names as SPIRE uses them (`resources.py`).
"""
