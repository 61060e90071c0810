"""What tests share: peers (sink, DNS, Redis), relays (in the loop and as processes),
the command line, bounded polling, disk faults."""
