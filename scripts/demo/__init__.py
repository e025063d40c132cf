"""The `make run` demo: a CA, two sidecars and two sample services on loopback."""
