"""FTP: what is a goodbye and what is FEAT's answer (Pure-FTPd's ``211 Logout.``).

Pure-FTPd 1.0.50 writes ``211 Logout.`` under TLS at the client's close_notify
and hangs up; taken for the answer to the plaintext ``FEAT`` behind the
close_notify it failed ``server.one-sided-close`` (R4) although nothing was
read.  The reference mode ``logout-at-close-notify`` does the same.
"""

from __future__ import annotations

from starttls_harness.dialects import Reply
from starttls_harness.dialects.ftp import FTP, split_ftp_reply


def _reply(data: bytes) -> Reply:
    reply, rest = split_ftp_reply(data)
    assert reply is not None and rest == b""
    return reply


def test_a_one_line_211_is_a_goodbye_not_feats_answer() -> None:
    logout = _reply(b"211 Logout.\r\n")
    assert FTP.is_goodbye(logout) and not FTP.is_sentinel_reply(logout)


def test_feats_multi_line_answer_is_the_sentinel() -> None:
    feat = _reply(b"211-Extensions supported:\r\n AUTH TLS\r\n UTF8\r\n211 End.\r\n")
    assert FTP.is_sentinel_reply(feat) and not FTP.is_goodbye(feat)


def test_the_closing_codes_are_goodbyes() -> None:
    for line in (b"221 Goodbye.\r\n", b"421 Timeout.\r\n"):
        assert FTP.is_goodbye(_reply(line))
    assert not FTP.is_goodbye(_reply(b'257 "/" is your current location\r\n'))
