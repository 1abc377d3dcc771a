"""The operator console: server-rendered pages under ``/console``, served offline.

Pages (Jinja2 templates in ``ehrbridge/templates/``, autoescaped; one script and
one stylesheet in ``ehrbridge/static/``, no CDN; charts are SVG drawn here):

* ``/console/login`` (public): a user presents an API token and gets a session
  cookie (``ehrbridge/auth.py``: ``Sessions``); ``POST /console/logout`` ends it;
* ``/console/sites`` (viewer): mode per model, messages per minute, the ACK mix,
  the last message per feed with silent feeds highlighted, consumer lag, dead
  letters and write-back errors; ``/console/sites/data`` is the same as JSON,
  which the page polls so its numbers move without a reload;
* ``/console/messages`` (viewer): search by control id, MRN, time, outcome and
  reason over the message index (``adapters/sqlite_message_index.py``), paged
  with totals; ``/console/messages/{topic}/{offset}``: one message's trace --
  the raw message (operator and admin only: PHI), the ACK, each result with the
  mapping rule that read it, the patient's predictions or why there is none,
  write-back failures;
* ``/console/dead-letters`` (operator): filter by reason and time, replay one,
  a selection or all matching through ``POST /api/dlq/replay`` (audited there);
* ``/console/models`` (viewer): per model, drift, missingness, scores, flag
  burden, calibration and ROC, the promotion criteria, and (admin) promote and
  demote through ``POST /api/models/{model}/mode`` (``ehrbridge/console_models.py``).

Every page that shows patient data is on ``audit_http.AUDITED``, like the API.
A page refused for want of a session answers 401 with a link (and a refresh)
to the login page; a role it lacks, 403.

To add a page: a template that ``{% extends "base.html" %}`` and fills
``content``, rendered with :meth:`Console.render`.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
import orjson
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from markupsafe import Markup
from starlette.exceptions import HTTPException as StarletteHTTPException

from ehrbridge.adapters.prometheus_metrics import PrometheusMetrics
from ehrbridge.adapters.sqlite_message_index import (
    OUTCOMES,
    IndexedMessage,
    MessageIndex,
    Search,
    row_of,
)
from ehrbridge.audit import audit_note
from ehrbridge.auth import (
    PRINCIPAL_KEY,
    SESSION_COOKIE,
    Authenticator,
    AuthFailure,
    Principal,
    Session,
)
from ehrbridge.config import ApiRole, SiteConfig
from ehrbridge.core.errors import EhrbridgeError
from ehrbridge.dlq import replayed_offsets
from ehrbridge.pipelines.er7 import Message
from ehrbridge.pipelines.facts import FactRules, ObservationTrace, Trace, extract
from ehrbridge.pipelines.results import ResultStore
from ehrbridge.pipelines.transport import Log, Record, topic_name
from ehrbridge.promotion import effective_mode

PAGE_SIZE = 50
DEAD_LETTER_PAGE = 500
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
# No inline script or style anywhere: a page that echoed an injected <script> would not run it.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
NAV: tuple[tuple[str, str, ApiRole], ...] = (
    ("/console/sites", "Sites", ApiRole.VIEWER),
    ("/console/messages", "Messages", ApiRole.VIEWER),
    ("/console/dead-letters", "Dead letters", ApiRole.OPERATOR),
    ("/console/models", "Models", ApiRole.VIEWER),
)
PHI_ROLE = ApiRole.OPERATOR  # who may read a raw message, as GET /api/messages/{offset}


@dataclass
class ConsoleParts:
    """What the console's pages read; the API hands in its own parts."""

    config: SiteConfig
    auth: Authenticator
    log: Log
    results: ResultStore
    metrics: PrometheusMetrics | None
    index_path: Path
    mode: Callable[[], Any]
    _index: MessageIndex | None = field(default=None, repr=False)

    def index(self) -> MessageIndex:
        """The message index, brought up to date with the log (at most 200k records a call)."""
        if self._index is None:
            self._index = MessageIndex(self.index_path, self.config.site)
        self._index.catch_up(self.log)
        return self._index


class Console:
    """Templates and the request context every page gets (user, CSRF token, nav)."""

    def __init__(self, parts: ConsoleParts) -> None:
        self.parts = parts
        loader = jinja2.PackageLoader("ehrbridge", "templates")
        self.env = jinja2.Environment(
            loader=loader, autoescape=True, undefined=jinja2.StrictUndefined
        )
        self.env.globals["static_url"] = lambda name: f"/console/static/{quote(name)}"

    def render(
        self, request: Request, template: str, title: str, status: int = 200, **values: Any
    ) -> HTMLResponse:
        session = self.parts.auth.session(request)
        user = request.scope.get(PRINCIPAL_KEY)
        context = {
            "site": self.parts.config.site,
            "title": title,
            "csrf": session.csrf if session else "",
            "user": _user(user) if isinstance(user, Principal) else None,
            "nav": [(h, label) for h, label, role in NAV if _may(user, role)],
            "current": request.url.path,
            **values,
        }
        body = self.env.get_template(template).render(context)
        return HTMLResponse(body, status, headers=_page_headers())


def _may(user: object, role: ApiRole) -> bool:
    return isinstance(user, Principal) and user.may(role)


def _user(principal: Principal) -> dict[str, Any]:
    return {"name": principal.name, "roles": sorted(r.value for r in principal.roles)}


def _page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "Cache-Control": "no-store",  # pages hold PHI: never kept by the browser or a proxy
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }


def add_console_routes(app: FastAPI, parts: ConsoleParts) -> None:
    console = Console(parts)
    _add_session_routes(app, console)
    _add_site_routes(app, console)
    _add_message_routes(app, console)
    _add_dead_letter_routes(app, console)
    from ehrbridge.console_models import add_model_routes  # it builds on this module's Console

    add_model_routes(app, console)
    _add_html_refusals(app, console)


def page_caller(auth: Authenticator, role: ApiRole) -> Callable[..., Principal]:
    """A dependency: the caller by session cookie (or bearer token) holding ``role``."""

    def caller(request: Request) -> Principal:
        try:
            return auth.authorize_request(request, role, request.headers.get("authorization"))
        except AuthFailure as failure:
            raise HTTPException(failure.status, failure.message, failure.headers) from None

    caller.__name__ = f"console_requires_{role.value}"
    return caller


# Browser pages: a refusal is a page (401: on to sign in), not JSON. /ui/patients/ is the
# clinician's risk page (ehrbridge/patient_page.py), opened from the CDS card.
_PAGES = ("/console", "/ui/patients/")


def _add_html_refusals(app: FastAPI, console: Console) -> None:
    """401/403 on a console page: a page saying so (401: on to the login), not JSON."""

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if not request.url.path.startswith(_PAGES) or exc.status_code not in (401, 403):
            return await http_exception_handler(request, exc)
        if exc.status_code == 401:
            here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            login = "/console/login?" + urlencode({"next": _local_next(here)})
            page = _signin_redirect(login)
            return HTMLResponse(page, 401, headers={**(exc.headers or {}), **_page_headers()})
        message = f"Your role does not allow this page ({exc.detail})."
        return console.render(request, "error.html", "Not allowed", 403, message=message)

    app.add_exception_handler(StarletteHTTPException, refused)


def _signin_redirect(login: str) -> str:
    target = html.escape(login, quote=True)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="0;url={target}"><title>Sign in</title>'
        f'<link rel="icon" href="/console/static/favicon.svg"></head>'
        f'<body><p><a href="{target}">Sign in to the ehrbridge console</a></p></body></html>'
    )


def _local_next(target: str) -> str:
    """Where to go after login: only a console path or a patient's risk page (the CDS
    card's link), never another site (no open redirect)."""
    if target.startswith(_PAGES) and not target.startswith("/console/log"):
        return target
    return "/console/sites"


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the console's two forms)."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return {k: v[0] for k, v in parse_qs(body, max_num_fields=20).items()}


def _add_session_routes(app: FastAPI, console: Console) -> None:
    auth = console.parts.auth

    @app.get("/", include_in_schema=False)
    @app.get("/console", include_in_schema=False)
    def console_home() -> RedirectResponse:
        """A browser pointed at the server lands on the console (or its login)."""
        return RedirectResponse("/console/sites", 303)

    @app.get("/console/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        suffix = Path(name).suffix
        folder = resources.files("ehrbridge") / "static"
        if "/" in name or suffix not in STATIC_TYPES or not (folder / name).is_file():
            raise HTTPException(404, "no such file")
        headers = {"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"}
        return Response(
            (folder / name).read_bytes(), media_type=STATIC_TYPES[suffix], headers=headers
        )

    @app.get("/console/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/console/sites") -> HTMLResponse:
        return console.render(request, "login.html", "Sign in", next=_local_next(next), error="")

    @app.post("/console/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await _form(request)
        target = _local_next(form.get("next", ""))
        token = form.get("token", "").strip()
        if not token:
            error = "Enter a token."
            return console.render(request, "login.html", "Sign in", 400, next=target, error=error)
        try:
            principal = auth.authenticate(f"Bearer {token}")
        except AuthFailure as failure:
            error = f"Not signed in: {failure.message}."
            return console.render(request, "login.html", "Sign in", 401, next=target, error=error)
        session_id, session = auth.sessions.open(principal)
        answer = RedirectResponse(target, 303)
        _set_cookie(answer, request, session_id, session)
        return answer

    @app.post("/console/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        form = await _form(request)
        session = auth.session(request)
        answer = RedirectResponse("/console/login", 303)
        if session is not None and form.get("csrf") == session.csrf:
            auth.sessions.close(request.cookies.get(SESSION_COOKIE))
            answer.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return answer


def _set_cookie(answer: Response, request: Request, session_id: str, session: Session) -> None:
    answer.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(session.expires - time.time()),
        path="/",
        httponly=True,  # no script reads it: an injected one could not steal the session
        samesite="strict",  # never sent on a request another site starts
        secure=request.url.scheme == "https",
    )


# ---------------------------------------------------------------------- sites


def _add_site_routes(app: FastAPI, console: Console) -> None:
    viewer = Depends(page_caller(console.parts.auth, ApiRole.VIEWER))

    @app.get("/console/sites", include_in_schema=False, dependencies=[viewer])
    def sites(request: Request) -> HTMLResponse:
        data = site_numbers(console.parts)
        return console.render(
            request,
            "sites.html",
            "Sites",
            data=data,
            operator=_may(request.scope.get(PRINCIPAL_KEY), ApiRole.OPERATOR),
            sparkline=sparkline(data["last_hour"]),
            ack_bar=ack_bar(data["acks"]),
        )

    @app.get("/console/sites/data", include_in_schema=False, dependencies=[viewer])
    def sites_data() -> JSONResponse:
        return JSONResponse(site_numbers(console.parts), headers={"Cache-Control": "no-store"})


def site_numbers(parts: ConsoleParts) -> dict[str, Any]:
    """What the sites page shows, from the site's metrics registry (counts, no patient)."""
    samples = _samples(parts.metrics)
    acks = {
        code: int(_sum(samples, "ehrbridge_messages_total", outcome=code))
        for code in ("aa", "ae", "ar", "filtered")
    }
    now = time.time()
    minutes = parts.index().per_minute(now - 3600, 60)  # the last hour, by minute
    models = _models(parts, samples)
    return {
        "site": parts.config.site,
        "at": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        # The last five whole minutes: one busy second does not read as a rate.
        "per_minute": round(sum(minutes[-6:-1]) / 5, 1),
        "last_hour": minutes,
        "acks": acks,
        "lag": int(_sum(samples, "ehrbridge_consumer_lag_records")),
        "dead_letters": int(_sum(samples, "ehrbridge_dead_letters_total")),
        "writeback_errors": int(
            _sum(samples, "ehrbridge_writeback_total")
            - _sum(samples, "ehrbridge_writeback_total", outcome="ok")
        ),
        "models": models,
        "feeds": _feeds(parts.metrics, now),
    }


Sample = tuple[str, dict[str, str], float]


def _samples(metrics: PrometheusMetrics | None) -> list[Sample]:
    if metrics is None:
        return []
    return [(s.name, s.labels, s.value) for f in metrics.registry.collect() for s in f.samples]


def _sum(samples: Sequence[Sample], name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def _models(parts: ConsoleParts, samples: Sequence[Sample]) -> list[dict[str, Any]]:
    names = {lab["model"] for n, lab, _ in samples if "model" in lab}
    names.update(m.name for m in parts.config.site_models)
    return [
        {
            "name": name,
            "mode": _mode_of(parts, name),
            "predictions": int(_sum(samples, "ehrbridge_predictions_total", model=name)),
            "not_scored": int(_sum(samples, "ehrbridge_not_scored_total", model=name)),
        }
        for name in sorted(names)
    ]


def _mode_of(parts: ConsoleParts, name: str) -> str:
    """Each of the site's models has its own mode file (a promotion switches one model)."""
    if name == parts.config.model.name:
        mode = parts.mode()  # the runtime's switch, read once per change of the file
        return str(getattr(mode, "value", mode))
    if name in {m.name for m in parts.config.site_models}:
        return effective_mode(parts.config, name).value
    return "not configured"  # counted under a name the site no longer runs


def _feeds(metrics: PrometheusMetrics | None, now: float) -> list[dict[str, Any]]:
    if metrics is None:
        return []
    found = []
    for source, feed in sorted(metrics.feeds_json().items()):
        silence, expected = feed["silence_s"], feed["expected_this_hour"]
        last = None if silence is None else now - silence
        found.append(
            {
                "source": source,
                "last": "never" if last is None else _clock(last),
                "silence": "—" if silence is None else _duration(silence),
                "expected": "unknown" if expected is None else f"{expected:.1f}",
                # monitoring/alerts.yml EhrbridgeFeedSilent: six expected gaps, >= 10 min
                "silent": bool(silence and expected and silence > max(21600 / expected, 600)),
            }
        )
    return found


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def sparkline(values: Sequence[float], width: int = 240, height: int = 40) -> Markup:
    """Messages per minute over the last hour, as an inline SVG polyline."""
    label = "Messages per minute over the last hour"
    if len(values) < 2:
        return Markup(
            f'<svg role="img" aria-label="{label}" width="{width}" height="{height}"></svg>'
        )
    top = max(*values, 1.0)
    step = width / (len(values) - 1)
    points = " ".join(
        f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return Markup(
        f'<svg role="img" aria-label="{label}" width="100%" height="{height}" '
        f'viewBox="0 0 {width} {height}" preserveAspectRatio="none">'
        f'<polyline fill="none" stroke="#1d4e89" stroke-width="2" points="{points}"/></svg>'
    )


def ack_bar(acks: dict[str, int], width: int = 240, height: int = 16) -> Markup:
    """The ACK mix as one stacked bar (AA green, AE amber, AR red), inline SVG."""
    colours = {"aa": "#2e7d32", "ae": "#b26a00", "ar": "#a4161a"}
    total = sum(acks.get(k, 0) for k in colours) or 1
    x, parts = 0.0, []
    for code, colour in colours.items():
        share = acks.get(code, 0) / total * width
        title = html.escape(f"{code.upper()} {acks.get(code, 0)}")
        parts.append(
            f'<rect x="{x:.1f}" y="0" width="{share:.1f}" height="{height}" fill="{colour}">'
            f"<title>{title}</title></rect>"
        )
        x += share
    return Markup(
        f'<svg role="img" aria-label="ACK mix" width="100%" height="{height}" '
        f'viewBox="0 0 {width} {height}" preserveAspectRatio="none">'
        f'<rect width="{width}" height="{height}" fill="#d0d7de"/>' + "".join(parts) + "</svg>"
    )


# ---------------------------------------------------------------------- messages


def _add_message_routes(app: FastAPI, console: Console) -> None:
    parts = console.parts
    viewer = Depends(page_caller(parts.auth, ApiRole.VIEWER))

    @app.get("/console/messages", include_in_schema=False, dependencies=[viewer])
    def messages(request: Request) -> HTMLResponse:
        query, page, form = _search_query(request)
        started = time.perf_counter()
        index = parts.index()
        rows = index.search(query, limit=PAGE_SIZE, offset=page * PAGE_SIZE)
        total = index.count(query)
        elapsed_ms = (time.perf_counter() - started) * 1000
        audit_note(request.scope).patients.extend(r.patient for r in rows if r.patient)
        return console.render(
            request,
            "messages.html",
            "Messages",
            q=query,
            form=form,
            rows=rows,
            total=total,
            first=page * PAGE_SIZE + 1,
            last=page * PAGE_SIZE + len(rows),
            elapsed_ms=elapsed_ms,
            outcomes=OUTCOMES,
            reasons=index.reasons(),
            prev=_page_link(request, page - 1) if page > 0 else None,
            next=_page_link(request, page + 1) if (page + 1) * PAGE_SIZE < total else None,
        )

    @app.get("/console/messages/{topic}/{offset}", include_in_schema=False, dependencies=[viewer])
    def trace(request: Request, topic: str, offset: int) -> HTMLResponse:
        return _trace_page(console, request, topic, offset)


def _search_query(request: Request) -> tuple[Search, int, dict[str, str]]:
    q = request.query_params

    def text(name: str) -> str | None:
        value = q.get(name, "").strip()
        return value or None

    since, until = _moment(text("since")), _moment(text("until"))
    outcome = text("outcome")
    query = Search(
        control_id=text("control_id"),
        patient=text("patient"),
        since=since.timestamp() if since else None,
        until=until.timestamp() if until else None,
        outcome=outcome if outcome in OUTCOMES else None,
        reason=text("reason"),
    )
    page = int(q["page"]) if q.get("page", "").isdigit() else 0
    form = {"since": _local(since), "until": _local(until)}
    return query, min(page, 10**9), form


def _moment(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise HTTPException(422, f"not a date and time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _local(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M") if moment else ""


def _page_link(request: Request, page: int) -> str:
    params = dict(request.query_params)
    params["page"] = str(page)
    return f"{request.url.path}?{urlencode(params)}"


def _read_one(log: Log, topic: str, offset: int) -> Record | None:
    batch = log.read(topic, after=offset - 1, limit=1)
    return batch[0] if batch and batch[0].offset == offset else None


def _trace_page(console: Console, request: Request, topic: str, offset: int) -> HTMLResponse:
    parts = console.parts
    if topic not in ("raw", "dlq"):
        raise HTTPException(404, "no such topic")
    record = _read_one(parts.log, topic_name(parts.config.site, topic), offset)
    if record is None:
        raise HTTPException(404, f"no stored message at {topic} offset {offset}")
    audit_note(request.scope).patients.append(record.key)
    index = parts.index()
    message = IndexedMessage(*row_of(topic, record))
    same = index.by_control_id(message.control_id) if message.control_id else []
    siblings = [m for m in same if (m.topic, m.offset) != (topic, offset)]
    observations, extraction_error = _observations(parts.config, record)
    stored = parts.results.list(patient_id=record.key, limit=20) if record.key else []
    predictions = [r.summary() for r in stored]
    user = request.scope.get(PRINCIPAL_KEY)
    raw = _text(record.value) if _may(user, PHI_ROLE) else None
    return console.render(
        request,
        "trace.html",
        f"Message {message.control_id or offset}",
        m=message,
        ack=_ack(message),
        detail=record.headers.get("error.detail", ""),
        raw=raw,
        observations=observations,
        extraction_error=extraction_error,
        predictions=predictions,
        no_prediction=_no_prediction(message, observations, extraction_error),
        writeback_failures=[s for s in siblings if s.stage == "writeback"],
        siblings=siblings,
    )


def _ack(message: IndexedMessage) -> dict[str, str]:
    if message.outcome in ("AA", "failed"):
        text = "MSA-1 AA: stored durably before the ACK went out"
        if message.outcome == "failed":
            text += "; a later stage dead-lettered it"
        return {"code": "AA", "text": text}
    return {"code": message.outcome, "text": f"MSA-1 {message.outcome}: {message.reason or ''}"}


def _observations(config: SiteConfig, record: Record) -> tuple[list[ObservationTrace], str]:
    """Each result of the message as the mapping reads it now (``mappings explain``'s trace)."""
    if record.headers.get("kind", "hl7v2").lower() not in ("hl7v2", "hl7"):
        return [], "FHIR payload: see the raw resource."
    trace = Trace()
    received = record.headers.get("received_at")
    try:
        moment = datetime.fromisoformat(received) if received else None
        extract(Message.parse(record.value), FactRules(config.mapping), trace, received_at=moment)
    except EhrbridgeError as error:
        return trace.observations, f"{error.reason}: {error.detail}"
    except ValueError as error:
        return trace.observations, f"unreadable: {error}"
    # With a trace, extraction notes what ingest would refuse (AE) instead of raising.
    return trace.observations, "; ".join(trace.problems)


def _no_prediction(
    message: IndexedMessage, observations: Sequence[ObservationTrace], error: str
) -> str:
    if message.outcome in ("AE", "AR"):
        return f"the message was refused at ingest ({message.reason})."
    if message.outcome == "failed":
        return f"processing failed ({message.reason}); replay it from the dead letters."
    if error:
        return error
    if not any(o.outcome == "used" for o in observations):
        return "no result in this message is a model input."
    return "not enough data or outside the model's validated population (see the patient page)."


def _text(value: bytes) -> str:
    text = value.decode("utf-8", errors="backslashreplace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ---------------------------------------------------------------------- dead letters


def _add_dead_letter_routes(app: FastAPI, console: Console) -> None:
    parts = console.parts
    operator = Depends(page_caller(parts.auth, ApiRole.OPERATOR))

    @app.get("/console/dead-letters", include_in_schema=False, dependencies=[operator])
    def dead_letters(request: Request) -> HTMLResponse:
        q = request.query_params
        reason = q.get("reason") or None
        since, until = _moment(q.get("since") or None), _moment(q.get("until") or None)
        again = q.get("again") == "1"
        index = parts.index()
        query = Search(
            reason=reason,
            since=since.timestamp() if since else None,
            until=until.timestamp() if until else None,
        )
        rows = _dead_letter_rows(parts, index, query, again)
        audit_note(request.scope).patients.extend(r["patient"] for r in rows if r["patient"])
        # "All matching" replays exactly the rows this filter matched (by offset): the
        # replay route's since/until are dead-letter times, the index's are receipt times.
        filtered = reason is not None or since is not None or until is not None
        selection: dict[str, Any] = (
            {"offsets": [r["offset"] for r in rows]} if filtered else {"all": True}
        )
        if again:
            selection["again"] = True
        return console.render(
            request,
            "dead_letters.html",
            "Dead letters",
            q={"reason": reason},
            form={"since": _local(since), "until": _local(until)},
            again=again,
            reasons=index.reasons(),
            rows=rows[:DEAD_LETTER_PAGE],
            total=len(rows),
            replay_filter=orjson.dumps(selection).decode(),
        )


def _dead_letter_rows(
    parts: ConsoleParts, index: MessageIndex, query: Search, again: bool
) -> list[dict[str, Any]]:
    """Dead letters matching the filter, newest first; replayed ones only with ``again``.

    Filtered by the time they were received (the index's); "replay all matching"
    sends exactly these offsets, whatever their dead-letter times.
    """
    done = replayed_offsets(parts.log, parts.config.site)
    found = []
    for outcome in ("AE", "AR", "failed"):
        wanted = Search(query.control_id, query.patient, query.since, query.until, outcome)
        wanted = replace(wanted, reason=query.reason)
        for m in index.search(wanted, limit=10_000):
            if m.topic == "dlq" and (again or m.offset not in done):
                found.append(m)
    found.sort(key=lambda m: (m.received_at, m.offset), reverse=True)
    return [_dead_letter_row(m, parts, done, i < DEAD_LETTER_PAGE) for i, m in enumerate(found)]


def _dead_letter_row(
    m: IndexedMessage, parts: ConsoleParts, done: set[int], shown: bool
) -> dict[str, Any]:
    dlq = topic_name(parts.config.site, "dlq")
    record = _read_one(parts.log, dlq, m.offset) if shown else None  # only where shown
    return {
        "offset": m.offset,
        "at": _clock(m.received_at),
        "reason": m.reason or "",
        "stage": m.stage or "",
        "control_id": m.control_id,
        "patient": m.patient or "",
        "detail": record.headers.get("error.detail", "") if record else "",
        "replayed": m.offset in done,
        "now": replay_preview(parts.config, record) if record else "",
    }


def replay_preview(config: SiteConfig, record: Record) -> str:
    """What a replay would meet now: the message read again with the current mapping.

    A message refused at ingest is parsed and mapped again, as ingest would; a later
    stage's failure depends on the model server or the EHR, which only a replay tries.
    """
    stage = record.headers.get("error.stage", "")
    if stage == "writeback":
        return "sends the result to the EHR again"
    if record.headers.get("kind", "hl7v2").lower() not in ("hl7v2", "hl7"):
        return "read again with the current mapping (FHIR)"
    observations, error = _observations(config, record)
    if error:
        return f"still fails with the current mapping: {error}"
    used = sum(1 for o in observations if o.outcome == "used")
    if stage == "ingest":
        return f"passes the current mapping ({used} result(s) used)"
    return f"maps ({used} result(s) used); then calls the model again"
