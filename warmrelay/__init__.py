"""warmrelay: an SMTP relay that warms up new dedicated sending IPs on its own."""

__version__ = "0.1.0"
