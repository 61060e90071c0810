"""What each delivery carries so that reports can come home (with ``bounces``).

Per (message, source IP): the IP's ``Feedback-ID`` and the DKIM signatures over it,
made here at delivery (acceptance only checked that a key exists): signing is
deterministic for the same bytes and the acceptance time, so every retry from that IP
sends the same bytes. Per recipient: its own transaction with a return path at the
bounce domain (VERP: the token names message, recipient, IP and provider) and our trace
header on top (after signing: trace, not content). Mail with a null sender (DSNs, ours
and the application's) keeps ``<>``: a bounce is never bounced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from warmrelay.config import Config
from warmrelay.delivery.dispatcher import Transaction
from warmrelay.feedback.token import Sent, Tokens, feedback_id
from warmrelay.mail.dkim import Signer
from warmrelay.queue.spool import SpooledMessage

log = logging.getLogger("warmrelay.feedback")


class Marks:
    def __init__(
        self,
        tokens: Tokens,
        config: Callable[[], Config],
        signer: Callable[[], Signer | None],
    ) -> None:
        self.tokens = tokens
        self._config = config
        self._signer = signer

    def transactions(
        self,
        msg: SpooledMessage,
        indices: Sequence[int],
        ip: str,
        provider: str,
        data: bytes,
    ) -> list[Transaction]:
        """The transactions of one send from ``ip``: one per recipient, each with its own
        return path and trace header, over the bytes signed for this IP."""
        signed = self.signed(msg, ip, data)
        if not msg.mail_from:
            return [Transaction("", [msg.rcpt_tos[i] for i in indices], signed)]
        txs = []
        for i in indices:
            rcpt = msg.rcpt_tos[i]
            sent = Sent(msg.queue_id, i, ip, provider, rcpt, msg.mail_from)
            txs.append(
                Transaction(
                    self.tokens.return_path(sent, rcpt), [rcpt], self.tokens.trace(sent) + signed
                )
            )
        return txs

    def signed(self, msg: SpooledMessage, ip: str, data: bytes) -> bytes:
        """The message as it leaves ``ip``: its Feedback-ID, signed with the keys of its
        From domain (if any: unsigned mail was accepted so, or refused at acceptance)."""
        config = self._config()
        assert config.bounces is not None
        sender_id = config.bounces.feedback_sender_id(config.smtp.hostname)
        content = feedback_id(ip, sender_id) + data
        signer = self._signer()
        if signer is None or not signer.keys:
            return content
        result = signer.sign(content, msg.received_at)
        if result.result != "signed" and result.result != "unsigned":
            log.warning("%s: DKIM at delivery: %s (sent unsigned)", msg.queue_id, result.summary)
        return result.data
