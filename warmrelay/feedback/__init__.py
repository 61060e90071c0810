"""Stage 8, feedback: what comes back after the handover. Our return path (a signed token
per recipient) and trace header, the intake of DSNs and complaints at the bounce domain,
their attribution to the IP and provider that carried the mail, and the rates per IP and
provider that warmup decisions need."""
