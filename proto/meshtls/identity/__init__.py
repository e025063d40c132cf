"""Identity code shared by the CA and the sidecar: pure functions and value objects.

Nothing here does network or database I/O; the only file I/O is the atomic writer in
`meshtls.identity.pem`.
"""
