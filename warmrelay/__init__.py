"""warmrelay: an SMTP relay that warms up new dedicated sending IPs on its own.

The tree reads as the data path, from the SMTP door to the disposition::

    smtp/      1  the listener: access policy, AUTH, TLS, limits; 250 once the spool has it
    queue/     2  the spool (fsync before 250)
               3  the scheduler: due deliveries to the delivery stage, waiting ones to the
                  deferred queue; the ready queues per (source IP, next hop)
    warmup/    4  the router and the warmup plan: pure policy (which IP, or not now)
               5  the counters and reservations under the caps; per-IP control records
    delivery/  6  one attempt: next hop, the SMTP client bound to the IP, the one reply
                  classifier, dispositions and DSNs
    operate/   7  metrics, logs, the admin endpoint and status page, the queue tools,
                  systemd notification, the supervisor of ``--workers``
    feedback/  8  what comes back after the handover: our return path, the intake of
                  DSNs and complaints at the bounce domain
    reputation/ 9 signals per (IP, provider) and day, the SNDS and Postmaster feeds, the
                  warmup controller of ``progress: reputation`` (pure) and its pairs
    events/   10  the application's events: built, written to the outbox, posted to the
                  webhook (signed, at least once), appended to events.file
    mail/         beside the path: DKIM signing, the identity preflight, suppression
    config/       the one configuration object, by section; what serve refuses at start
    cli/          the command line, one module per command
    app.py        the assembly: builds the stages and runs them (start, reload, stop)
    errors.py     the one error root

A delivery's walk goes down the tree and comes back to the scheduler only to wait:
``queue.scheduler`` (due) → ``delivery.attempt.Attempts.run`` (expiry, next hop,
provider) → ``warmup.router.Router.route`` (a reservation under the caps, or a hold) →
``queue.readyqueue`` (a free connection) → ``Attempts.send`` →
``delivery.dispatcher`` (the transaction from the source IP) → ``delivery.replies``
(classified) → ``warmup.reservation`` (kept or given back) →
``delivery.dispositions.Recorder`` (log line, metrics, spool marks, DSN, the event via
``events.emitter``) → back to
``queue.scheduler`` only for what waits (``later``, ``hold``, ``due``) or to ``forget``
a finished message.
"""

__version__ = "0.1.0"
