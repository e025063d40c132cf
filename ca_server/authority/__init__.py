"""The CA's key material and signing.

- `kek`: the key-encryption key that protects CA private keys at rest.
- `keys`: CA key generation, and encryption of CA keys under the KEK.
- `templates`: pure certificate builders for roots, intermediates and X509-SVID leaves.
- `material`: creating authorities (bootstrap, rotation) as `ca_server.domain.Authority`.
- `upstream`: loading an operator-supplied intermediate that chains to the operator's root.
- `signer`: issuing leaves from the active intermediate (the hot path).
- `keyring`: the authorities in use at runtime: the signer and the trust bundle.
"""
