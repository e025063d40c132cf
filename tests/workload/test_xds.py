"""The SotW handshake bookkeeping of one SDS stream (the wire is tested in test_sds.py)."""

from __future__ import annotations

from sidecar.sds.xds import Kind, SotwStream

NAMES = ("spiffe://example.org/a", "ROOTCA")


def test_nothing_is_due_before_the_first_request() -> None:
    stream = SotwStream()
    assert not stream.wants("v1", forced=False)
    assert not stream.wants("v1", forced=True)


def test_initial_request_is_answered_even_with_a_version_sent_on_an_earlier_stream() -> None:
    stream = SotwStream()
    verdict = stream.on_request(NAMES, "v1", "", None)
    assert verdict.kind is Kind.INITIAL
    assert verdict.respond
    assert stream.wants("v1", forced=verdict.respond)


def test_ack_with_the_same_names_is_not_answered_but_a_new_version_is_pushed() -> None:
    stream = SotwStream()
    stream.on_request(NAMES, "", "", None)
    nonce = stream.sent("v1")
    ack = stream.on_request(NAMES, "v1", nonce, None)
    assert (ack.kind, ack.respond) == (Kind.ACK, False)
    assert stream.acked_version == "v1"
    assert not stream.wants("v1", forced=False)
    assert stream.wants("v2", forced=False)


def test_changed_names_are_answered_at_once() -> None:
    stream = SotwStream()
    stream.on_request(NAMES, "", "", None)
    nonce = stream.sent("v1")
    verdict = stream.on_request((*NAMES, "default"), "v1", nonce, None)
    assert verdict.respond
    assert stream.names == (*NAMES, "default")


def test_nack_records_the_rejected_version_and_is_not_answered_with_it_again() -> None:
    stream = SotwStream()
    stream.on_request(NAMES, "", "", None)
    n1 = stream.sent("v1")
    stream.on_request(NAMES, "v1", n1, None)
    n2 = stream.sent("v2")
    nack = stream.on_request(NAMES, "v1", n2, "private key does not match")
    assert (nack.kind, nack.respond) == (Kind.NACK, False)
    assert stream.rejected_version == "v2"
    assert stream.acked_version == "v1"
    assert not stream.wants("v2", forced=False)
    assert stream.wants("v3", forced=False)


def test_requests_with_a_stale_nonce_change_nothing() -> None:
    stream = SotwStream()
    stream.on_request(NAMES, "", "", None)
    n1 = stream.sent("v1")
    stream.sent("v2")
    stale = stream.on_request(("ROOTCA",), "v1", n1, None)
    assert (stale.kind, stale.respond) == (Kind.STALE, False)
    assert stream.names == NAMES
