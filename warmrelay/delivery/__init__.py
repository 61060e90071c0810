"""Stage 6, delivery: one attempt of one delivery, from the next hop to its dispositions:
next-hop lookup, the SMTP client bound to the source IP, the one reply classifier, the
disposition records and DSNs."""
