"""Stages 2 and 3, the queue: the durable spool, the scheduler that moves due deliveries
to the ready queues and waiting ones to the deferred queue, and the ready queues per
(source IP, next hop)."""
