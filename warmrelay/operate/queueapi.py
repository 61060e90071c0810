"""The queue tools' admin API: list, summary, show, flush, hold, release, delete, bounce.

``GET /queue`` (filters ``domain``, ``ip``, ``state``, ``min_age_s``), ``GET
/queue/summary`` (qshape), ``GET /queue/{id}``; ``POST /queue/{action}`` with a JSON
body ``{"queue_ids": [...]}`` or ``{"domain": "..."}`` or ``{"all": true}`` (bounce
also ``"reason"``). Every change is logged with who asked. All of it is private: a
configured admin token is required, as for ``/status`` (addresses are personal data).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmrelay.errors import SpoolError
from warmrelay.operate.actions import QueueActions, Target
from warmrelay.operate.api import ApiRequest, Caller, Response, json_page
from warmrelay.operate.queueview import ActionResult, Filter, MessageView, merge_summaries, summary
from warmrelay.queue.spool import Spool

if TYPE_CHECKING:
    from warmrelay.operate.admin import AdminServer

log = logging.getLogger("warmrelay.queue")

ACTIONS = ("flush", "hold", "release", "delete", "bounce")
HEADERS_MAX = 100  # header fields shown by `queue show`


def target_of(body: dict[str, Any]) -> Target:
    """The action's target from a request body; ValueError says what is missing."""
    ids = body.get("queue_ids") or []
    domain = body.get("domain")
    everything = body.get("all") is True
    if not isinstance(ids, list) or not all(isinstance(q, str) for q in ids):
        raise ValueError("queue_ids must be a list of queue ids")
    if domain is not None and not isinstance(domain, str):
        raise ValueError("domain must be a string")
    if sum(map(bool, (ids, domain, everything))) != 1:
        raise ValueError('give exactly one of "queue_ids", "domain" or "all": true')
    return Target(tuple(ids), domain.lower() if domain else None, everything)


def headers_of(data: bytes) -> tuple[tuple[str, str], ...]:
    """The message's header fields (unfolded), for `queue show`."""
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2] if end >= 0 else data
    parsed = BytesHeaderParser(policy=compat32).parsebytes(head)
    return tuple((k, " ".join(str(v).split())) for k, v in parsed.items()[:HEADERS_MAX])


class QueueApi:
    """The queue of one relay process (its scheduler and spool)."""

    def __init__(
        self,
        actions: QueueActions,
        spool: Spool,
        clock: Callable[[], datetime],
        today: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.actions = actions
        self.today = today  # this process's tally of today (a worker's, for its supervisor)
        self.spool = spool
        self.clock = clock

    def register(self, admin: AdminServer) -> None:
        admin.route("GET", "/queue", self.list)
        admin.route("GET", "/queue/summary", self.summary)
        admin.route("GET", "/queue/{queue_id}", self.show)
        admin.route("POST", "/queue/{action}", self.act)

    def _now(self) -> float:
        return self.clock().timestamp()

    async def dispatch(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Any], caller: Caller
    ) -> Response:
        """The routes of ``register`` without an HTTP server (a worker's queue socket)."""
        parts = path.strip("/").split("/")
        if method == "GET" and parts == ["reasons"]:  # for the supervisor's status page
            return json_page(self.actions.latest_reasons())
        if method == "GET" and parts == ["today"] and self.today is not None:  # likewise
            return json_page(self.today())
        if parts[0] != "queue" or len(parts) > 2:
            return json_page({"error": "not found"}, 404)
        if method == "GET" and len(parts) == 1:
            return await self.list(ApiRequest({}, query, body, caller))
        if method == "GET" and parts[1] == "summary":
            return await self.summary(ApiRequest({}, query, body, caller))
        if method == "GET":
            return await self.show(ApiRequest({"queue_id": parts[1]}, query, body, caller))
        if method == "POST" and len(parts) == 2:
            return await self.act(ApiRequest({"action": parts[1]}, query, body, caller))
        return json_page({"error": "method not allowed"}, 405)

    async def serve_unix(self, path: Path) -> asyncio.Server:
        """A ``serve --workers`` worker's queue, for its supervisor only (mode 0600 in
        state.dir): one request per connection, a JSON line each way. The supervisor has
        checked the caller's token and names the caller in the request."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = json.loads(await reader.readline())
                status, _, body = await self.dispatch(
                    str(request["method"]),
                    str(request["path"]),
                    {str(k): str(v) for k, v in (request.get("query") or {}).items()},
                    request.get("body") or {},
                    Caller(str(request.get("caller") or "supervisor"), "forwarded", ""),
                )
                writer.write(b'{"status": %d, "body": ' % status + body.rstrip() + b"}\n")
                await writer.drain()
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.warning("queue socket %s: bad request: %s", path, exc)
            except Exception:  # a bug: logged, the supervisor hears no answer
                log.exception("queue socket %s: request failed", path)
            finally:
                writer.close()

        server = await asyncio.start_unix_server(handle, path=str(path))
        os.chmod(path, 0o600)
        return server

    async def list(self, request: ApiRequest) -> Response:
        try:
            wanted = Filter.from_query(request.query)
        except ValueError as exc:
            return json_page({"error": str(exc)}, 400)
        now = self._now()
        views = [v for v in self.actions.views() if wanted.matches(v, now)]
        return json_page({"count": len(views), "messages": [v.to_json(now) for v in views]})

    async def summary(self, request: ApiRequest) -> Response:
        top = request.query.get("top", "50")
        if not top.isdigit():
            return json_page({"error": f"top={top!r}: a number of domains"}, 400)
        return json_page(summary(self.actions.views(), self._now(), int(top)))

    async def show(self, request: ApiRequest) -> Response:
        queue_id = request.params["queue_id"]
        view = self.actions.view(queue_id)
        if view is None:
            return json_page({"error": f"no message {queue_id} in the queue"}, 404)
        return json_page(self.detail(view))

    def detail(self, view: MessageView) -> dict[str, Any]:
        out = view.to_json(self._now(), detail=True)
        try:
            out["headers"] = [list(h) for h in headers_of(self.spool.read_data(view.queue_id))]
        except SpoolError as exc:
            out["headers_error"] = str(exc)
        return out

    async def act(self, request: ApiRequest) -> Response:
        action = request.params["action"]
        if action not in ACTIONS:
            return json_page({"error": f"unknown action {action!r}: {', '.join(ACTIONS)}"}, 404)
        try:
            target = target_of(request.body)
        except ValueError as exc:
            return json_page({"error": str(exc)}, 400)
        who = str(request.caller)
        if action == "bounce":
            reason = request.body.get("reason")
            if not isinstance(reason, str) or not reason.strip():
                return json_page({"error": 'bounce needs a "reason" (it goes into the DSN)'}, 400)
            result = await self.actions.bounce(target, reason, who)
        elif action == "delete":
            result = await self.actions.delete(target, who)
        else:
            result = {
                "flush": self.actions.flush,
                "hold": self.actions.hold,
                "release": self.actions.release,
            }[action](target)
        ids = result.queue_ids
        if ids:  # an action that changed nothing is no operator's change
            log.warning(
                "operator: queue %s by %s: %d message(s) %s", action, who, len(ids), _ids(ids)
            )
        for queue_id, why in result.failed.items():
            log.error("operator: queue %s %s by %s failed: %s", action, queue_id, who, why)
        return json_page(result.to_json(action, target.queue_ids))


def _ids(ids: list[str], most: int = 20) -> str:
    shown = " ".join(ids[:most])
    return shown + (f" (+{len(ids) - most})" if len(ids) > most else "")


def worker_socket(state_dir: Path, index: int) -> Path:
    """Where worker ``index`` of ``serve --workers`` serves its queue to the supervisor."""
    return state_dir / f"worker-{index}.sock"


class FleetQueueApi:
    """The supervisor's queue API (``serve --workers``): each worker has its own spool and
    scheduler, so every request goes to all workers (unix sockets in state.dir) and the
    answers are merged; an action names the queue ids some worker did."""

    def __init__(self, sockets: Sequence[Path], timeout_s: Callable[[], float]) -> None:
        self.sockets = list(sockets)
        self.timeout_s = timeout_s  # admin.worker_timeout_s: follows reloads
        self.missing: list[int] = []  # workers that did not answer the latest question

    def register(self, admin: AdminServer) -> None:
        admin.route("GET", "/queue", self.list)
        admin.route("GET", "/queue/summary", self.summary)
        admin.route("GET", "/queue/{queue_id}", self.show)
        admin.route("POST", "/queue/{action}", self.act)

    async def _ask(
        self, method: str, path: str, request_: ApiRequest, body: dict[str, Any] | None = None
    ) -> list[tuple[int, int, Any]]:
        """(worker index, status, JSON) from every worker that answers within
        ``admin.worker_timeout_s`` (the others are logged and left in ``missing``: a stopped
        worker must not hang the operator, whose client waits longer)."""
        timeout_s = self.timeout_s()

        async def one(index: int, sock: Path) -> tuple[int, int, Any] | None:
            request = {
                "method": method,
                "path": path,
                "query": request_.query,
                "body": body,
                "caller": str(request_.caller),
            }
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock))
                try:
                    writer.write(json.dumps(request).encode() + b"\n")
                    await writer.drain()
                    answer = json.loads(await asyncio.wait_for(reader.read(), timeout_s))
                finally:
                    writer.close()
                return index, int(answer["status"]), answer["body"]
            except TimeoutError:
                why = f"no answer within {timeout_s:g} s (admin.worker_timeout_s)"
            except (OSError, ValueError, KeyError, TypeError) as exc:
                why = str(exc) or type(exc).__name__
            log.warning("queue: worker %d did not answer %s %s: %s", index, method, path, why)
            return None

        answers = await asyncio.gather(*(one(i, p) for i, p in enumerate(self.sockets)))
        self.missing = [i for i, a in enumerate(answers) if a is None]
        return [a for a in answers if a is not None]

    def _with_missing(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer, saying which workers it lacks (their mail is not in it)."""
        return {**body, "missing_workers": self.missing} if self.missing else body

    async def list(self, request: ApiRequest) -> Response:
        messages: list[dict[str, Any]] = []
        for index, status, body in await self._ask("GET", "/queue", request):
            if status != 200:
                return json_page(body, status)
            messages += [{**m, "worker": index} for m in body["messages"]]
        messages.sort(key=lambda m: (m["received_at"], m["queue_id"]))
        return json_page(self._with_missing({"count": len(messages), "messages": messages}))

    async def summary(self, request: ApiRequest) -> Response:
        top = request.query.get("top", "50")
        if not top.isdigit():
            return json_page({"error": f"top={top!r}: a number of domains"}, 400)
        return json_page(await self.summary_of(int(top), request.caller))

    async def summary_of(self, top: int, caller: Caller | None = None) -> dict[str, Any]:
        every = ApiRequest({}, {"top": "1000000"}, {}, caller or Caller("status", "none", ""))
        parts = [
            b for _, status, b in await self._ask("GET", "/queue/summary", every) if status == 200
        ]
        return self._with_missing(merge_summaries(parts, top))

    async def todays_of(self) -> Sequence[tuple[int, int, Any]]:
        """Each worker's tally of today: (worker index, status, JSON)."""
        return await self._ask(
            "GET", "/today", ApiRequest({}, {}, {}, Caller("status", "none", ""))
        )

    async def reasons_of(self) -> dict[str, dict[str, Any]]:
        """The latest deferral and bounce per provider over all workers (the newest wins)."""
        ask = ApiRequest({}, {}, {}, Caller("status", "none", ""))
        merged: dict[str, dict[str, Any]] = {}
        for _, status, body in await self._ask("GET", "/reasons", ask):
            if status != 200:
                continue
            for provider, kinds in body.items():
                mine = merged.setdefault(provider, {})
                for kind, entry in kinds.items():
                    if kind not in mine or entry["time"] > mine[kind]["time"]:
                        mine[kind] = entry
        return merged

    async def show(self, request: ApiRequest) -> Response:
        queue_id = request.params["queue_id"]
        for index, status, body in await self._ask("GET", f"/queue/{queue_id}", request):
            if status == 200:
                return json_page({**body, "worker": index})
        if self.missing:
            lacking = ", ".join(map(str, self.missing))
            return json_page(
                {"error": f"no message {queue_id} with the workers that answered (not: {lacking})"},
                503,
            )
        return json_page({"error": f"no message {queue_id} in the queue"}, 404)

    async def act(self, request: ApiRequest) -> Response:
        action = request.params["action"]
        answers = await self._ask("POST", f"/queue/{action}", request, request.body)
        merged = ActionResult()
        for _, status, body in answers:
            if status != 200:
                return json_page(body, status)
            merged.queue_ids += body["queue_ids"]
            merged.failed |= body.get("failed") or {}
            merged.left_on_hold += int(body.get("left_on_hold") or 0)
        return json_page(
            self._with_missing(merged.to_json(action, request.body.get("queue_ids") or []))
        )
