"""Data-plane bench: the meshtls sidecar proxy side by side with Envoy, stunnel and a direct
connection, in one topology (load client -> client proxy -> server proxy -> sink).

    .venv/bin/python -m bench.dataplane [--runs 3] [--only envoy stunnel ...]
"""
