"""The clinician's risk page for one patient: ``GET /ui/patients/{patient_id}``.

What a clinician who follows the CDS card's "Risk details" link sees
(``ehrbridge/cds_hooks.py``), in plain language and without JavaScript:

* the current score, or **why there is none**: outside the population the
  model was validated for (each rule broken), or not enough data (what is
  missing) -- the reasons the pipeline stored on the patient's state
  (``last_outcome``, ``pipelines/features.py``);
* the risk over time as an inline SVG chart (``ehrbridge/risk_chart.py``)
  with the site's interpretation thresholds drawn on it, and the same values
  in a table, each score with the results it was computed from: value, unit,
  date and code;
* the model: what it is for, whom it is valid for, and its citation (the
  model file's words; KFRE's when the site has no model file).

Patient safety: a score anchored in the future is not shown (as no card
shows it); when the patient's newest record fell outside the model's
population the earlier scores are labelled as earlier, not current; and in
shadow mode a banner says the scores are not yet validated at this site
(clinicians get no card then, but a viewer can still open the page). Those
reasons are on the patient state, so the page is served only where the state
can be read: a process that cannot (ingest-only on Kafka) answers its path with
a 404 problem naming the role that serves it (``ehrbridge/api.py``), never a
score it cannot check against the model's domain.

It needs the ``viewer`` role (a bearer token, or whatever else the auth
dependency takes) and is a read of patient data, so it is audited
(``ehrbridge/audit_http.py``). The answer is ``no-store`` and sends no
referrer: the URL names the patient.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ehrbridge.audit import audit_note
from ehrbridge.config import Mode, SiteConfig
from ehrbridge.core.contracts import utcnow
from ehrbridge.pipelines.features import age_at
from ehrbridge.pipelines.jsonshape import items, obj
from ehrbridge.pipelines.rendering import Shown
from ehrbridge.pipelines.rendering import shown as rendering
from ehrbridge.pipelines.results import ResultStore, StoredResult
from ehrbridge.pipelines.state import PatientState, StateStore
from ehrbridge.risk_chart import STYLES, Point, Series, Threshold, svg

PATH = "/ui/patients/{patient_id}"
HISTORY_LIMIT = 200  # scores on the chart and in the table, newest kept
_TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True),
)
_HEADERS = {
    "Cache-Control": "no-store",  # patient data: not kept by the browser or a proxy
    "Referrer-Policy": "no-referrer",  # the URL names the patient
    "X-Content-Type-Options": "nosniff",
    # Nothing from elsewhere, no script: the page is complete as served.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'none'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'"
    ),
}
# A site without a model file runs KFRE 4-variable (Tangri 2011/2016).
_KFRE = {
    "use": "The 2- and 5-year risk of kidney failure (dialysis or a kidney transplant)",
    "population": "Adults (18 or older) with chronic kidney disease stage G3 to G5",
    "citation": (
        "Tangri N et al. JAMA 2011;305(15):1553-1559; recalibrated in Tangri N et al. "
        "JAMA 2016;315(2):164-174"
    ),
}


@dataclass(frozen=True, slots=True)
class Output:
    code: str  # the Observation component's code, "kfre-risk-2y"
    label: str  # "Kidney failure risk within 2 years"
    percent: float


@dataclass(frozen=True, slots=True)
class Score:
    identifier: str
    at: datetime
    outputs: tuple[Output, ...]
    interpretation: str
    flagged: bool  # a band was reached (not N)
    inputs: tuple[str, ...]
    status: str
    model: str  # name, version and calibration, as the result records them
    note: str = ""


@dataclass
class NoScore:
    headline: str
    reasons: list[str] = field(default_factory=list)


@dataclass
class PatientView:
    patient_id: str
    site: str
    model: str
    about: dict[str, str]
    scores: list[Score]  # newest first
    total: int
    current: Score | None
    no_score: NoScore | None
    not_shown_future: int
    chart: str
    legend: list[tuple[str, str, str]]  # (label, colour, dash)
    thresholds: list[str]
    selected: str | None
    title: str = "Risk details"
    shadow: bool = False  # the site is still being validated: say so on the page
    api_links: bool = True  # link each score's Observation (not in a SMART launch)


def add_patient_page(
    app: FastAPI,
    site: tuple[SiteConfig, Callable[[], Mode]],
    results: ResultStore,
    states: StateStore,
    viewer: Sequence[Any],
) -> None:
    """The page; ``site`` is the config and the mode in force (promote/demote switch it)."""

    @app.get(PATH, include_in_schema=False, dependencies=list(viewer))
    def patient_page(
        request: Request, patient_id: str, result: str | None = Query(None, max_length=200)
    ) -> HTMLResponse:
        audit_note(request.scope).patients.append(patient_id)
        return render(site, results, states, patient_id, selected=result)


def render(
    site: tuple[SiteConfig, Callable[[], Mode]],
    results: ResultStore,
    states: StateStore,
    patient_id: str,
    *,
    selected: str | None = None,
    launched: bool = False,
) -> HTMLResponse:
    """The page as HTML; ``launched``: opened by a SMART launch, which grants this page only
    (so it links to no API route)."""
    config, mode = site
    state = states.get(patient_id)
    view = build_view(config, results, patient_id, state, selected=selected)
    view.shadow, view.api_links = mode() is Mode.SHADOW, not launched
    html = _TEMPLATES.get_template("patient.html").render(view=view)
    return HTMLResponse(html, headers=_HEADERS)


def build_view(
    config: SiteConfig,
    results: ResultStore,
    patient_id: str,
    state: PatientState | None,
    *,
    selected: str | None = None,
) -> PatientView:
    """What the page shows, from the stored results and the patient's state."""
    not_after = utcnow() + config.mapping.values.future_tolerance
    stored = results.list(patient_id=patient_id, limit=HISTORY_LIMIT)
    shown = [r for r in stored if datetime.fromisoformat(r.anchor) <= not_after]
    scores = [_score(r, state) for r in shown]
    newest_out = _out_of_domain_since(state, scores[0].at if scores else None)
    current = None if newest_out or not scores else scores[0]
    chart, legend, thresholds = _chart(scores, rendering(config))
    return PatientView(
        patient_id=patient_id,
        site=config.site,
        model=scores[0].model if scores else f"{config.model.name} {_version(config)}".strip(),
        about=_about(config),
        scores=scores,
        total=results.count(patient_id=patient_id),
        current=current,
        no_score=_no_score(state, current, bool(scores)),
        not_shown_future=len(stored) - len(shown),
        chart=chart,
        legend=legend,
        thresholds=thresholds,
        selected=selected,
        title=rendering(config).code.display,  # writeback.code, else the model file's
    )


def _version(config: SiteConfig) -> str:
    definition = config.model.definition
    return definition.model.version if definition is not None else ""


def _about(config: SiteConfig) -> dict[str, str]:
    """Intended use, population and citation: the model file's words, else KFRE's."""
    definition = config.model.definition
    if definition is None:
        return dict(_KFRE)
    identity = definition.model
    return {
        "use": identity.intended_use.rstrip("."),
        "population": identity.intended_population.rstrip("."),
        "citation": identity.citation,
    }


def _score(result: StoredResult, state: PatientState | None) -> Score:
    observation = result.observation
    concept: dict[str, Any] = next(iter(items(observation.get("interpretation"))), {})
    code = next((str(c.get("code", "")) for c in items(concept.get("coding"))), "")
    at = datetime.fromisoformat(result.anchor)
    return Score(
        identifier=result.identifier,
        at=at,
        outputs=_outputs(observation),
        interpretation=str(concept.get("text") or "not classified"),
        flagged=code not in ("", "N"),
        inputs=tuple(_inputs(observation, state, at)),
        status=result.status,
        model=result.model,
        note=" ".join(str(n.get("text", "")) for n in items(observation.get("note"))),
    )


def _outputs(observation: dict[str, Any]) -> tuple[Output, ...]:
    """The model's outputs by name, as the Observation's components state them (percent)."""
    found = []
    for component in items(observation.get("component")):
        coding: dict[str, Any] = next(iter(items(obj(component.get("code")).get("coding"))), {})
        value = obj(component.get("valueQuantity")).get("value")
        if isinstance(value, int | float):
            code = str(coding.get("code", ""))
            found.append(Output(code, str(coding.get("display") or code), float(value)))
    return tuple(found)


def _inputs(observation: dict[str, Any], state: PatientState | None, at: datetime) -> list[str]:
    """Each result the score was computed from, with value, unit and date."""
    facts = {f.ref: f for fs in (state.facts.values() if state else ()) for f in fs}
    shown = []
    for source in items(observation.get("derivedFrom")):
        fact = facts.get(str(obj(source.get("identifier")).get("value", "")))
        if fact is None:  # no longer on the state (it keeps the latest results only)
            shown.append(str(source.get("display", "")))
            continue
        name = f"{fact.feature} ({fact.display})" if fact.display else fact.feature
        shown.append(
            f"{name}: {fact.comparator}{fact.value:g} {readable_unit(fact.unit)}, "
            f"result of {fact.effective.date().isoformat()} ({fact.system} {fact.code})"
        )
    if state is not None and state.birth_date is not None:
        shown.append(f"age: {age_at(state.birth_date, at):.0f} years (from the date of birth)")
    if state is not None and state.sex:
        shown.append(f"sex: {_SEX.get(state.sex, state.sex)}")
    return shown


_SEX = {"F": "female", "M": "male"}


def readable_unit(unit: str) -> str:
    """A UCUM unit as people write it: ``mL/min/{1.73_m2}`` is mL/min/1.73 m²."""
    unit = re.sub(r"\{([^}]*)\}", lambda m: m.group(1).replace("_", " "), unit)
    return re.sub(r"\bm2\b", "m²", unit)


def _out_of_domain_since(state: PatientState | None, newest: datetime | None) -> list[str]:
    """The rules the patient's newest record broke, if it is newer than the newest score."""
    outcome = state.last_outcome if state is not None else None
    if not outcome or "out_of_domain" not in outcome:
        return []
    if newest is not None and datetime.fromisoformat(outcome["anchor"]) < newest:
        return []
    return [str(reason) for reason in outcome["out_of_domain"]]


def _no_score(state: PatientState | None, current: Score | None, earlier: bool) -> NoScore | None:
    """Why there is no current score, in words; None when there is one."""
    outcome = (state.last_outcome if state is not None else None) or {}
    if "out_of_domain" in outcome and current is None:
        return NoScore(
            "No current score: this patient is outside the population the model was "
            "validated for, so its result would not be reliable."
            + (" The scores below are earlier ones." if earlier else ""),
            [_plain(r) for r in outcome["out_of_domain"]],
        )
    if "not_enough_data" in outcome:
        missing = [f"{k}: {v}" for k, v in sorted(outcome["not_enough_data"].items())]
        headline = "There is not enough recent data to compute a score."
        if current is not None:
            headline = (
                "The newest results could not be scored (not enough data); "
                "the score shown is the latest one."
            )
        return NoScore(headline, missing)
    if current is not None:
        return None
    if state is None:
        return NoScore("No score: ehrbridge holds no results for this patient.")
    return NoScore("No score yet: the results received so far have not led to a calculation.")


def _plain(reason: str) -> str:
    """``out_of_domain: egfr 71.9 >= 60`` as "egfr 71.9 >= 60 (outside the population)"."""
    kind, _, detail = reason.partition(": ")
    words = {
        "out_of_domain": "outside the validated population",
        "out_of_range": "outside the range the model accepts",
    }
    return f"{detail} ({words[kind]})" if kind in words and detail else reason


def _chart(scores: list[Score], view: Shown) -> tuple[str, list[tuple[str, str, str]], list[str]]:
    oldest_first = list(reversed(scores))
    codes = list(dict.fromkeys(o.code for s in oldest_first for o in s.outputs))
    series = [
        Series(
            label=next(o.label for s in oldest_first for o in s.outputs if o.code == code),
            points=tuple(
                Point(s.at, o.percent) for s in oldest_first for o in s.outputs if o.code == code
            ),
        )
        for code in codes
    ]
    # A band is about one output; the chart's series are the Observation's components.
    component = {c.output: c.code.code for c in view.components}
    thresholds = [
        Threshold(index, band.at_least * 100, band.display)
        for band in view.bands
        for index, code in enumerate(codes)
        if component.get(band.output) == code
    ]
    chart = svg(series, thresholds, "Risk over time")
    legend = [(s.label, *STYLES[i % len(STYLES)][:2]) for i, s in enumerate(series)]
    return chart, legend, [t.label for t in thresholds]
