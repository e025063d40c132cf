"""Helpers the tests share: a real PostgreSQL server, a test PKI, CA fixtures."""
