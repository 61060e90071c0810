"""The recording sink, offering PIPELINING. aiosmtpd does not announce it (1.4), but it
reads commands line by line from a stream, so pipelined ones are answered in order: adding
the keyword to EHLO is all a pipelining client needs to pipeline to it."""

from __future__ import annotations

from aiosmtpd.smtp import SMTP, Envelope, Session

from support.sink import Sink


class PipeliningSink(Sink):
    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [*responses[:-1], "250-PIPELINING", responses[-1]]
