"""`python -m sidecar` is `meshtls-sidecar`."""

from sidecar.cli import main

main()
