"""XMPP's login is two exchanges: SASL, then the stream restart its success calls for.

Prosody does not read a restart pipelined behind ``<auth/>`` (its parser is
reset at the success): the next stanza gets ``<unsupported-stanza-type/>``.
The real-software tier logs in to Prosody, so a pipelined restart fails there;
these tests pin the order the server role's login step follows.
"""

from __future__ import annotations

from starttls_harness.dialects import dialect_named


def test_the_restart_leaves_only_after_the_success() -> None:
    xmpp = dialect_named("xmpp")
    auth, restart = xmpp.login_exchanges("tester", "correct horse")
    assert auth.startswith(b"<auth ") and b"mechanism='PLAIN'" in auth
    assert b"<stream:stream" not in auth
    assert restart.startswith(b"<?xml") and b"<stream:stream" in restart


def test_a_success_alone_is_a_whole_reply() -> None:
    xmpp = dialect_named("xmpp")
    reply, rest = xmpp.split_reply(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    assert reply is not None and reply.ok and rest == b""
    refused, _ = xmpp.split_reply(
        b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
    )
    assert refused is not None and not refused.ok


def test_other_dialects_log_in_with_one_command() -> None:
    smtp = dialect_named("smtp")
    assert smtp.login_exchanges("u", "p") == (smtp.login("u", "p"),)
