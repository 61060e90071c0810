"""Stage 7 and the operator's side: metrics and logs, the admin HTTP endpoint, the status
page, the queue tools' API and views, systemd notification, and the supervisor of
``serve --workers``."""
