"""Configuration: one YAML file, loaded once into typed, frozen objects (``Config``).

The relay runs from one ``Config``: loaded at start, never changed after; a reload
loads a new one and swaps it in whole (a file with errors changes nothing). Loading
reports every problem at once, each with its key path (``ips[0].warmup.start``), and
unknown keys are errors. The keys, their meaning and their defaults are part of the
public contract (DESIGN.md; README's configuration sections, and config.example.yaml,
which documents every key): a file that loads today must load and mean the same
tomorrow.

The package, by part:

- ``values``: what the sections share (the frozen base, addresses, networks,
  host:port, host names, the open-relay guard, key paths, secret keys);
- the sections: ``smtp`` (listeners, TLS, users, limits), ``service`` (admin, state,
  dns, log), ``delivery`` (delivery, throttle, blocks, smarthost, providers),
  ``warmup`` (ips and their warmup blocks), ``mail`` (dkim, preflight, suppression),
  ``feedback`` (bounces), ``reputation``, ``events`` (webhook, file);
- ``model``: the root ``Config``;
- ``loader``: YAML and validation into a Config or a ConfigError (``load_config``,
  ``parse_config``, ``config_error_lines``); ``crosskeys``: the rules across keys;
- ``changes``: what a reload changes (``describe_changes``, ``redact_url``);
- ``checks``: warnings beyond validity, for the file and this host;
- ``startup``: what serve refuses at start (``start_problems``, ``admin_token``).

Import from ``warmrelay.config``: the names below are the package's interface; its
modules are how it is arranged.
"""

from warmrelay.config.changes import describe_changes, redact_url
from warmrelay.config.checks import bind_error, config_warnings, host_warnings
from warmrelay.config.delivery import (
    BlockConfig,
    ConnectionsConfig,
    CooldownConfig,
    DeliveryConfig,
    Patterns,
    ProviderConfig,
    SmarthostConfig,
    ThrottleConfig,
)
from warmrelay.config.events import ARGS_HEADER, EventsConfig, WebhookConfig, webhook_secret
from warmrelay.config.feedback import BouncesConfig, bounce_secret
from warmrelay.config.loader import (
    ConfigSyntaxError,
    config_error_lines,
    load_config,
    parse_config,
)
from warmrelay.config.mail import (
    DKIM_HEADERS,
    DkimConfig,
    DkimDomainConfig,
    DkimKeyConfig,
    PreflightConfig,
    SuppressionConfig,
)
from warmrelay.config.model import Config
from warmrelay.config.reputation import (
    Ladder,
    PostmasterConfig,
    ReputationConfig,
    SndsConfig,
    ThresholdsConfig,
)
from warmrelay.config.service import AdminConfig, DnsConfig, LogConfig, StateConfig
from warmrelay.config.smtp import ListenerConfig, SmtpConfig, TlsConfig, UserConfig
from warmrelay.config.startup import admin_token, start_problems, state_dir_problem
from warmrelay.config.values import (
    MIN_RELAY_PREFIX,
    Address,
    DnsServer,
    HostName,
    HostPort,
    IPAddress,
    IPNetwork,
    Listen,
    Network,
    RelayNetwork,
    format_path,
    is_public_network,
    parse_host_port,
)
from warmrelay.config.warmup import (
    EligibleConfig,
    IPConfig,
    ProviderCapConfig,
    ScheduleField,
    WarmupConfig,
)

__all__ = [
    "ARGS_HEADER",
    "DKIM_HEADERS",
    "MIN_RELAY_PREFIX",
    "Address",
    "AdminConfig",
    "BlockConfig",
    "BouncesConfig",
    "Config",
    "ConfigSyntaxError",
    "ConnectionsConfig",
    "CooldownConfig",
    "DeliveryConfig",
    "DkimConfig",
    "DkimDomainConfig",
    "DkimKeyConfig",
    "DnsConfig",
    "DnsServer",
    "EligibleConfig",
    "EventsConfig",
    "HostName",
    "HostPort",
    "IPAddress",
    "IPConfig",
    "IPNetwork",
    "Ladder",
    "Listen",
    "ListenerConfig",
    "LogConfig",
    "Network",
    "Patterns",
    "PostmasterConfig",
    "PreflightConfig",
    "ProviderCapConfig",
    "ProviderConfig",
    "RelayNetwork",
    "ReputationConfig",
    "ScheduleField",
    "SmarthostConfig",
    "SmtpConfig",
    "SndsConfig",
    "StateConfig",
    "SuppressionConfig",
    "ThresholdsConfig",
    "ThrottleConfig",
    "TlsConfig",
    "UserConfig",
    "WarmupConfig",
    "WebhookConfig",
    "admin_token",
    "bind_error",
    "bounce_secret",
    "config_error_lines",
    "config_warnings",
    "describe_changes",
    "format_path",
    "host_warnings",
    "is_public_network",
    "load_config",
    "parse_config",
    "parse_host_port",
    "redact_url",
    "start_problems",
    "state_dir_problem",
    "webhook_secret",
]
