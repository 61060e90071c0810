"""Stage 10, events for the application: one per recipient and outcome (processed,
delivered, deferred, bounce, dropped, spamreport) in SendGrid's Event Webhook shape,
written to a durable outbox and POSTed to ``events.webhook.url`` in signed batches (at
least once), and appended as JSON lines to ``events.file``.

- ``model``: pure: the event's fields, its id, the application's custom arguments;
- ``outbox``: the durable queue of events not acknowledged yet (SQLite under state.dir);
- ``webhook``: the poster (batches, HMAC signature, backoff, expiry) and ``verify``;
- ``emitter``: what the data path calls (``Events``): never raises, never blocks mail.
"""
