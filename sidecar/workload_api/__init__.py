"""The SPIFFE Workload API on a Unix socket: workloads that do their own TLS fetch their
X509-SVIDs and the trust bundle here, and get every rotation pushed on the open stream.

Callers are identified by the kernel (SO_PEERCRED) and receive the identities whose entry
selectors all match them (`attestation.py`). The gRPC server is grpclib, because it runs on
asyncio's own Unix server and so can reach the accepted socket (`unixgrpc.py`; the reasons
are in docs/WORKLOAD_API.md). The same server and attestation carry Envoy SDS
(`sidecar.sds`).
"""
