"""SIGHUP reload: a good file applies at once, a bad one changes nothing."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import yaml
from support.relay import relay_doc, running, send, status
from support.relayproc import RelayProcess
from support.sink import Sink

from warmrelay.config import load_config


async def test_reload_applies_a_good_file_and_refuses_a_bad_one(tmp_path: Path, sink: Sink) -> None:
    path = tmp_path / "relay.yaml"
    doc = relay_doc(tmp_path, sink.port, cap=1)
    path.write_text(yaml.safe_dump(doc))
    async with running(load_config(path)) as relay:
        await send(relay, ["a@example.test"])
        await send(relay, ["b@example.test"])
        await sink.wait_for(2)
        assert sink.by_peer() == {"127.0.0.2": 1, "127.0.0.3": 1}

        path.write_text("ips: [\n")  # broken YAML
        assert not await relay.reload(path)
        bad = dict(doc, overflow="sideways")
        path.write_text(yaml.safe_dump(bad))
        assert not await relay.reload(path)
        assert (await status(relay))["ips"][0]["cap"] == 1  # still the running config

        doc["ips"][0]["warmup"]["schedule"] = [3] * 3650
        doc["smtp"]["listen"] = ["127.0.0.1:1"]  # needs a restart: kept as running
        path.write_text(yaml.safe_dump(doc))
        assert await relay.reload(path)
        assert (await status(relay))["ips"][0]["cap"] == 3
        await send(relay, ["c@example.test"])  # the listener still works where it was
        await send(relay, ["d@example.test"])
        await sink.wait_for(4)
    assert sink.by_peer() == {"127.0.0.2": 3, "127.0.0.3": 1}


async def test_sighup_reloads_a_running_process(
    tmp_path: Path, sink: Sink, relay_process: Callable[..., Awaitable[RelayProcess]]
) -> None:
    doc = relay_doc(tmp_path, sink.port, cap=1)
    relay = await relay_process(doc)
    doc["ips"][0]["warmup"]["schedule"] = [5] * 3650
    relay.config_path.write_text(yaml.safe_dump(doc))
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)
    await relay.wait_for_line("reload: ")
    relay.config_path.write_text("smtp: {colour: blue}\n")
    relay.proc.send_signal(signal.SIGHUP)
    await relay.wait_for_line("the running configuration stays")
    assert await relay.terminate() == 0
    assert any("reload:" in line and "applied" in line for line in relay.log)
    assert any("smtp.colour: unknown key" in line for line in relay.log)
