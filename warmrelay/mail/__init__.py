"""What makes mail acceptable to receivers, beside the data path: DKIM signing, the
identity preflight of IPs and signing domains, and the suppression of dead addresses."""
