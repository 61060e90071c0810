"""Stage 1, SMTP in: the listener that takes mail from applications (access policy, AUTH,
TLS, limits) and answers 250 only once the spool holds the message."""
