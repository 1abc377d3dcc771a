"""The six benchmark scenarios, each beside its baselines.

Every scenario returns a JSON-able dict: ``params``, ``ehrbridge`` (ours),
``naive`` (``bench/naive.py``), ``floor`` (``bench/floor.py``, Kafka produce
and consume of the same bytes) and ``ratios``, plus ``table``: the rows that
``ehrbridge bench`` prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from ehrbridge.bench.common import free_port, ratio
from ehrbridge.bench.floor import kafka_floor
from ehrbridge.bench.httpload import Request, http_load
from ehrbridge.bench.pipeline import ModelLatency, SiteUnderTest, site_under_test
from ehrbridge.bench.services import REPO_ROOT, Services, kafka_bootstrap

SYNTHEA = REPO_ROOT.parent / "shared" / "corpus" / "fhir" / "synthea-ckd"
CDS_PATIENT_FHIR_ID = "ecaea95c-46de-4ac9-a58d-4847d1a3e574"  # Stewart Stanton's Patient.id
CDS_PATIENT_MRN = "e1c92057-888b-4d8a-a459-5c1c4eed82c7"  # ...and his Synthea MR identifier
SYNTHEA_SYSTEM = "http://hospital.smarthealthit.org"
E2E_P99_LIMIT_MS = 1000.0
WARM_BUNDLE = "Liz_Conn_27c911c6-f045-4ffa-af5d-6eba57ac94b2.json"  # the smallest


@dataclass
class Options:
    rate: float | None = None
    seconds: float | None = None
    senders: int | None = None  # default per scenario
    transport: str = "embedded"
    split: bool = False  # embedded: the roles as processes sharing the SQLite files
    smoke: bool = False
    max: bool = False
    concurrency: int = 4
    workers: int = 2
    baselines: bool = True  # the naive pipeline
    floor: bool = True  # Kafka produce + consume
    run_dir: Path = Path("bench/results/run")
    check: bool = False  # stages: compare CPU µs/msg with the baseline (bench/regression.py)
    write_baseline: bool = False  # stages: record the baseline instead
    baseline: Path | None = None  # default: bench/baseline.json
    model_latency: ModelLatency = field(default_factory=ModelLatency)  # e2e, scale: slow model

    def sender_count(self, default: int) -> int:
        return self.senders or (2 if self.smoke else default)

    def pick(self, full: float, smoke: float, given: float | None = None) -> float:
        if given is not None:
            return given
        return smoke if self.smoke else full


Row = list[Any]


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kafka": kafka_version(),
        "load_average_at_start": os.getloadavg(),
    }


def kafka_version() -> str | None:
    """The broker version, from the jar scripts/kafka runs (``kafka_2.13-X.jar``)."""
    from ehrbridge.bench.common import kafka_broker_pid

    pid = kafka_broker_pid()
    if pid is None:
        return None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    classpath = next((a for i, a in enumerate(cmdline) if i and cmdline[i - 1] == b"-cp"), b"")
    libs = Path(classpath.decode().rstrip("*"))
    for jar in sorted(libs.glob("kafka_2.13-*.jar")):
        return jar.stem.removeprefix("kafka_2.13-")
    return None


# ------------------------------------------------------------------ ingest --


def ingest(opts: Options) -> dict[str, Any]:
    """N concurrent MLLP senders; accepted messages/s and ACK latency."""
    seconds = opts.pick(20, 1.5, opts.seconds)
    rate = opts.rate or 0.0  # default: closed loop, as fast as ACKs come
    # MLLP allows one message in flight per connection: closed-loop throughput needs many.
    opts.senders = opts.sender_count(16)
    cap = int(seconds * 4000 / opts.senders) + 10
    with site_under_test(
        opts.run_dir / "ingest", transport=opts.transport, roles=("ingest",)
    ) as site:
        if not opts.smoke:  # smoke: the trial itself is the warm-up
            site.warm_up(100, 5)
        ours = site.trial(rate=rate, seconds=seconds, senders=opts.senders, cap=cap)
    result: dict[str, Any] = {
        "params": _params(opts, rate=rate, seconds=seconds),
        "ehrbridge": ours,
    }
    if opts.baselines:
        with site_under_test(opts.run_dir / "ingest-naive", naive="ingest") as naive:
            if not opts.smoke:
                naive.warm_up(5, 1)
            result["naive"] = naive.trial(
                rate=rate, seconds=seconds, senders=opts.senders, cap=cap // 10 + 10
            )
    if opts.floor:
        result["floor"] = kafka_floor(
            kafka_bootstrap(), rate=rate, seconds=seconds, count=0 if rate else ours["accepted"]
        )
    naive, floor = result.get("naive", {}), result.get("floor", {})
    result["ratios"] = {
        "accepted_rate_vs_naive": ratio(ours["accepted_rate"], naive.get("accepted_rate", 0)),
        "accepted_rate_vs_floor": ratio(ours["accepted_rate"], floor.get("produce_rate") or 0),
        "ack_p99_vs_floor": ratio(
            ours["ack_latency"]["p99_ms"], floor.get("ack_latency", {}).get("p99_ms", 0)
        ),
    }
    result["table"] = _ingest_rows(result)
    return result


def _ingest_rows(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    headers = ["pipeline", "accepted/s", "ACK p50 ms", "ACK p95 ms", "ACK p99 ms", "CPU µs/msg"]
    rows: list[Row] = []
    for name, label in (("ehrbridge", "ehrbridge"), ("naive", "naive (hl7apy, fsync each)")):
        if name in result:
            r = result[name]
            lat = r["ack_latency"]
            rows.append(
                [
                    label,
                    r["accepted_rate"],
                    lat["p50_ms"],
                    lat["p95_ms"],
                    lat["p99_ms"],
                    r["cpu"]["total"]["cpu_us_per_msg"],
                ]
            )
    if "floor" in result:
        f = result["floor"]
        lat = f["ack_latency"]
        rows.append(
            [
                "floor (Kafka produce, acks=all)",
                f["produce_rate"],
                lat["p50_ms"],
                lat["p95_ms"],
                lat["p99_ms"],
                f["cpu"]["total"]["cpu_us_per_msg"],
            ]
        )
    return headers, rows


# --------------------------------------------------------------------- e2e --


def e2e(opts: Options) -> dict[str, Any]:
    """A sustained rate of renal ORU^R01 through to Observations in the FHIR stand-in."""
    rate = opts.pick(500, 50, opts.rate)
    seconds = opts.pick(30, 2, opts.seconds)
    opts.senders = opts.sender_count(4)
    result: dict[str, Any] = {"params": _params(opts, rate=rate, seconds=seconds)}
    with site_under_test(
        opts.run_dir / "e2e",
        transport=opts.transport,
        split=opts.split,
        model_latency=opts.model_latency,
    ) as site:
        if not opts.smoke:
            site.warm_up(200, 5)
        result["ehrbridge"] = site.trial(rate=rate, seconds=seconds, senders=opts.senders)
        if opts.max:
            trial_s = min(seconds, 20.0)
            result["max"] = find_max(site, rate, trial_s, opts.senders, 2 if opts.smoke else 6)
    if opts.baselines:
        naive_seconds = min(seconds, 20.0)
        with site_under_test(opts.run_dir / "e2e-naive", naive="e2e") as naive:
            if not opts.smoke:
                naive.warm_up(5, 1)
            result["naive"] = naive.trial(
                rate=0, seconds=naive_seconds, senders=opts.senders, cap=2000
            )
    if opts.floor:
        result["floor"] = kafka_floor(kafka_bootstrap(), rate=rate, seconds=seconds)
    ours, naive_r, floor = result["ehrbridge"], result.get("naive", {}), result.get("floor", {})
    result["ratios"] = {
        "delivered_rate_vs_naive_max": ratio(
            ours["delivered_rate"], naive_r.get("delivered_rate", 0)
        ),
        "e2e_p99_vs_floor_p99": ratio(
            ours["e2e_latency"]["p99_ms"],
            floor.get("produce_to_consume_latency", {}).get("p99_ms", 0),
        ),
        "cpu_per_msg_vs_floor": ratio(
            ours["cpu"]["total"]["cpu_us_per_msg"] or 0,
            floor.get("cpu", {}).get("total", {}).get("cpu_us_per_msg") or 0,
        ),
    }
    if "max" in result:
        result["ratios"]["max_rate_vs_naive_max"] = ratio(
            result["max"]["max_rate"] or 0, naive_r.get("delivered_rate", 0)
        )
    result["table"] = _e2e_rows(result)
    return result


def find_max(
    site: SiteUnderTest, start: float, seconds: float, senders: int, max_trials: int
) -> dict[str, Any]:
    """The highest offered rate whose trial keeps p99 event→Observation within 1 s."""
    good: float | None = None
    bad: float | None = None
    rate = start
    trials = []
    for _ in range(max_trials):
        r = site.trial(rate=rate, seconds=seconds, senders=senders)
        ok = (
            r["e2e_latency"]["p99_ms"] <= E2E_P99_LIMIT_MS
            and r["missing"] == 0
            and r["not_accepted"] == 0
            and r["send_rate"] >= 0.95 * rate
        )
        trials.append(
            {
                "offered_rate": rate,
                "ok": ok,
                "delivered_rate": r["delivered_rate"],
                "send_rate": r["send_rate"],
                "e2e_latency": r["e2e_latency"],
                "ack_latency": r["ack_latency"],
                "cpu": r["cpu"],
                "patients": r["patients"],
                "patients_in_earlier_trials": r["patients_in_earlier_trials"],
            }
        )
        if ok:
            good = max(good or 0.0, rate)
        else:
            bad = min(bad or rate, rate)
        if bad is None:
            rate = round(rate * 1.5)
        elif good is None:
            rate = round(rate / 2)
        elif bad / good <= 1.1:
            break
        else:
            rate = round((good + bad) / 2)
    return {"max_rate": good, "first_failing_rate": bad, "trials": trials}


def _e2e_rows(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    headers = ["pipeline", "offered/s", "delivered/s", "e2e p50 ms", "e2e p95 ms", "e2e p99 ms",
               "ACK p99 ms", "CPU µs/msg"]  # fmt: skip
    rows: list[Row] = []
    for name, label in (("ehrbridge", "ehrbridge"), ("naive", "naive (closed loop)")):
        if name in result:
            r = result[name]
            e = r["e2e_latency"]
            rows.append(
                [
                    label,
                    r["offered_rate"],
                    r["delivered_rate"],
                    e["p50_ms"],
                    e["p95_ms"],
                    e["p99_ms"],
                    r["ack_latency"]["p99_ms"],
                    r["cpu"]["total"]["cpu_us_per_msg"],
                ]
            )
    for trial in result.get("max", {}).get("trials", []):
        e = trial["e2e_latency"]
        rows.append(
            [
                f"ehrbridge --max trial ({'ok' if trial['ok'] else 'fails'})",
                trial["offered_rate"],
                trial["delivered_rate"],
                e["p50_ms"],
                e["p95_ms"],
                e["p99_ms"],
                trial["ack_latency"]["p99_ms"],
                trial["cpu"]["total"]["cpu_us_per_msg"],
            ]
        )
    if "floor" in result:
        f = result["floor"]
        e = f["produce_to_consume_latency"]
        rows.append(
            [
                "floor (Kafka produce+consume)",
                result["params"]["rate"],
                f["end_to_end_rate"],
                e["p50_ms"],
                e["p95_ms"],
                e["p99_ms"],
                f["ack_latency"]["p99_ms"],
                f["cpu"]["total"]["cpu_us_per_msg"],
            ]
        )
    return headers, rows


# ------------------------------------------------------------------- scale --


def scale(opts: Options) -> dict[str, Any]:
    """One processing worker against two, same offered rate (Kafka: workers share partitions)."""
    rate = opts.pick(1500, 60, opts.rate)
    seconds = opts.pick(20, 2, opts.seconds)
    opts.senders = opts.sender_count(4)
    result: dict[str, Any] = {"params": _params(opts, rate=rate, seconds=seconds)}
    for workers in (1, opts.workers):
        with site_under_test(
            opts.run_dir / f"scale-{workers}",
            transport="kafka",
            workers=workers,
            model_latency=opts.model_latency,
        ) as site:
            if not opts.smoke:
                site.warm_up(200, 5)
            result[f"workers_{workers}"] = site.trial(
                rate=rate, seconds=seconds, senders=opts.senders
            )
    if opts.floor:
        result["floor"] = kafka_floor(kafka_bootstrap(), rate=rate, seconds=seconds)
    one, two = result["workers_1"], result[f"workers_{opts.workers}"]
    result["ratios"] = {
        "throughput_second_worker": ratio(two["delivered_rate"], one["delivered_rate"]),
        "e2e_p99_second_worker": ratio(two["e2e_latency"]["p99_ms"], one["e2e_latency"]["p99_ms"]),
    }
    headers = ["run", "offered/s", "delivered/s", "e2e p50 ms", "e2e p99 ms", "CPU µs/msg",
               "process-role cores", "machine cores busy"]  # fmt: skip
    rows: list[Row] = []
    for workers in (1, opts.workers):
        r = result[f"workers_{workers}"]
        cpu = r["cpu"]
        cores = sum(v["cores"] or 0 for k, v in cpu.items() if k.startswith("process-"))
        rows.append(
            [
                f"ehrbridge, {workers} processing worker(s)",
                rate,
                r["delivered_rate"],
                r["e2e_latency"]["p50_ms"],
                r["e2e_latency"]["p99_ms"],
                cpu["total"]["cpu_us_per_msg"],
                round(cores, 2),
                cpu["total"]["cores"],
            ]
        )
    if "floor" in result:
        f = result["floor"]
        rows.append(
            [
                "floor (Kafka produce+consume)",
                rate,
                f["end_to_end_rate"],
                f["produce_to_consume_latency"]["p50_ms"],
                f["produce_to_consume_latency"]["p99_ms"],
                f["cpu"]["total"]["cpu_us_per_msg"],
                None,
                f["cpu"]["total"]["cores"],
            ]
        )
    result["table"] = (headers, rows)
    return result


# ------------------------------------------------------------------ stages --


def stages(opts: Options) -> dict[str, Any]:
    from ehrbridge.bench.stages import measure_stages

    if opts.check or opts.write_baseline:
        return stages_check(opts)
    count = int(opts.pick(2000, 200))
    with Services(opts.run_dir / "stages") as services:
        services.start_servers("model", "fhir")
        result = measure_stages(
            services, count, naive=opts.baselines, floor=opts.floor, smoke=opts.smoke
        )
    result["params"] = _params(opts, messages=count)
    return result


def stages_check(opts: Options) -> dict[str, Any]:
    """Median CPU µs/msg per step against the committed baseline (or recorded as it)."""
    from ehrbridge.bench import regression
    from ehrbridge.bench.stages import measure_stages

    how = regression.plan(opts.smoke)
    path = opts.baseline or regression.BASELINE
    with Services(opts.run_dir / "stages-check") as services:
        services.start_servers("model", "fhir")

        def once(count: int) -> list[dict[str, Any]]:
            found = measure_stages(services, count, naive=False, floor=False, smoke=opts.smoke)
            rows: list[dict[str, Any]] = found["stages"]
            return rows

        measured = regression.measure(once, how)
    result: dict[str, Any] = {
        "params": _params(opts, messages=how.messages, repeats=how.repeats, baseline=str(path)),
        "measured": measured,
    }
    if opts.write_baseline:
        regression.write_baseline(path, how.mode, measured, machine())
        rows = [[step, us] for step, us in measured["cpu_us_per_msg"].items()]
        result["table"] = (["step", "CPU µs/msg (recorded as the baseline)"], rows)
        return result
    verdicts = regression.compare(measured, regression.read_baseline(path, how.mode))
    result["regressed"] = [v.step for v in verdicts if v.regressed]
    result["check"] = "fail" if result["regressed"] else "pass"
    result["table"] = regression.verdict_table(verdicts)
    return result


# --------------------------------------------------------------- FHIR site --


def _fhir_site(services: Services) -> None:
    services.start_servers("model", "fhir")
    config = services.write_site_config(template="site-fhir.yaml", name="fhir-site")
    services.start_site(config, "fhir-site")


def _post_bundle(client: httpx.Client, api: str, raw: bytes) -> float:
    t0 = time.perf_counter()
    response = client.post(
        f"{api}/fhir", content=raw, headers={"content-type": "application/fhir+json"}
    )
    elapsed = time.perf_counter() - t0
    if response.status_code != 200:
        raise RuntimeError(f"FHIR ingest answered {response.status_code}: {response.text[:300]}")
    return elapsed


def _wait_results(client: httpx.Client, api: str, mrn: str, timeout_s: float = 120) -> float:
    """When the patient's results were all delivered (perf_counter time).

    Done = the patient's state exists (the bundle was processed) and every result
    is delivered, unchanged for a second (a patient may have none: not enough data).
    """
    deadline = time.monotonic() + timeout_s
    last: tuple[int, bool] | None = None
    since = time.perf_counter()
    while time.monotonic() < deadline:
        state = client.get(f"{api}/api/patients/{mrn}")
        found = client.get(f"{api}/api/results", params={"patient": mrn, "limit": 1000}).json()
        results = found["results"]
        now = (
            len(results),
            state.status_code == 200 and all(r["status"] == "delivered" for r in results),
        )
        if now != last:
            last, since = now, time.perf_counter()
        elif now[1] and time.perf_counter() - since >= 1.0:
            return since
        time.sleep(0.02)
    raise TimeoutError(f"results for {mrn[:8]}... were not delivered")


def _result_count(client: httpx.Client, api: str, mrn: str) -> int:
    found = client.get(f"{api}/api/results", params={"patient": mrn, "limit": 1000}).json()
    return len(found["results"])


def cds(opts: Options) -> dict[str, Any]:
    """CDS Hooks patient-view latency under concurrent requests."""
    seconds = opts.pick(15, 1, opts.seconds)
    concurrency = 2 if opts.smoke else opts.concurrency
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/1", "patientId": CDS_PATIENT_FHIR_ID},
    }
    result: dict[str, Any] = {"params": _params(opts, seconds=seconds)}
    with Services(opts.run_dir / "cds") as services:
        _fhir_site(services)
        api = services.api_url
        raw = next(SYNTHEA.glob(f"*{CDS_PATIENT_MRN}.json")).read_bytes()
        with httpx.Client(timeout=60, headers=services.auth()) as client:
            _post_bundle(client, api, raw)
            _wait_results(client, api, CDS_PATIENT_MRN)
            cards = client.post(
                f"{api}/cds-services/kfre-patient-view", json=body, headers=services.cds_auth()
            ).json()
            if not cards["cards"]:
                raise RuntimeError("no CDS card for the scored patient")
        # Each call signs a fresh JWT (outside the timed part): the service takes a jti once.
        signed_by = (str(services.credentials), f"{api}/cds-services/kfre-patient-view")
        hook = Request("POST", f"{api}/cds-services/kfre-patient-view", body, signed_by)
        result["ehrbridge"] = http_load(hook, concurrency=concurrency, seconds=seconds)
        if opts.baselines:
            port = services.start_server(
                "naive-cds", "--fhir", services.fhir_base, "--patient-system", SYNTHEA_SYSTEM
            )
            naive_body = {**body, "context": {**body["context"], "patientId": CDS_PATIENT_MRN}}
            naive_hook = Request(
                "POST", f"http://127.0.0.1:{port}/cds-services/kfre-patient-view", naive_body
            )
            naive_cards = httpx.post(naive_hook.url, json=naive_body, timeout=30).json()
            if not naive_cards["cards"]:
                raise RuntimeError("the naive CDS service found no risk Observation")
            result["naive"] = http_load(naive_hook, concurrency=concurrency, seconds=seconds)
            result["floor_http"] = http_load(
                Request("GET", f"{api}/health"), concurrency=concurrency, seconds=seconds
            )
    ours = result["ehrbridge"]
    result["ratios"] = {
        "p99_vs_naive": ratio(
            ours["latency"]["p99_ms"], result.get("naive", {}).get("latency", {}).get("p99_ms", 0)
        ),
        "p99_vs_http_floor": ratio(
            ours["latency"]["p99_ms"],
            result.get("floor_http", {}).get("latency", {}).get("p99_ms", 0),
        ),
    }
    headers = ["service", "concurrency", "requests/s", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    rows: list[Row] = []
    for key, label in (
        ("ehrbridge", "ehrbridge patient-view (stored prediction)"),
        ("naive", "naive (search the EHR + fhir.resources per request)"),
        ("floor_http", "floor: GET /health on the same server"),
    ):
        if key in result:
            r = result[key]
            lat = r["latency"]
            rows.append([label, r["concurrency"], r["rate"], lat["p50_ms"], lat["p95_ms"],
                         lat["p99_ms"], lat["max_ms"]])  # fmt: skip
    result["table"] = (headers, rows)
    return result


def fhir_bundle(opts: Options) -> dict[str, Any]:
    """Whole Synthea CKD patient Bundles through FHIR ingest, timed per bundle."""
    rounds = int(opts.pick(3, 1))
    paths = sorted(SYNTHEA.glob("*.json"), key=lambda p: p.stat().st_size)
    if opts.smoke:
        paths = paths[:1]
    result: dict[str, Any] = {"params": _params(opts, rounds=rounds), "bundles": []}
    with Services(opts.run_dir / "fhir-bundle") as services:
        _fhir_site(services)
        api = services.api_url
        with httpx.Client(timeout=120, headers=services.auth()) as client:
            warm = SYNTHEA / WARM_BUNDLE
            _post_bundle(client, api, warm.read_bytes())  # warm up: imports, connections
            _wait_results(client, api, warm.stem.split("_")[-1])
            for path in paths:
                result["bundles"].append(_one_bundle(client, services, path, rounds, opts))
    headers = ["bundle", "MB", "entries", "POST p50 ms", "POST max ms", "results", "delivered s",
               "naive ms", "floor ms", "naive / ours"]  # fmt: skip
    rows: list[Row] = [
        [
            b["bundle"],
            b["mb"],
            b["entries"],
            b["post_median_ms"],
            b["post_max_ms"],
            b["results"],
            b["delivered_s"],
            b.get("naive_ms"),
            b.get("floor_ms"),
            b.get("naive_vs_ours"),
        ]
        for b in result["bundles"]
    ]
    result["table"] = (headers, rows)
    return result


def _one_bundle(
    client: httpx.Client, services: Services, path: Path, rounds: int, opts: Options
) -> dict[str, Any]:
    raw = path.read_bytes()
    mrn = path.stem.split("_")[-1]
    started = time.perf_counter()
    posts = [_post_bundle(client, services.api_url, raw)]  # a new patient: timed to delivery
    delivered = _wait_results(client, services.api_url, mrn) - started
    posts += [_post_bundle(client, services.api_url, raw) for _ in range(rounds - 1)]
    row: dict[str, Any] = {
        "bundle": path.name.split("_")[0]
        + " "
        + path.name.split("_")[1]
        + (" (again: the warm-up)" if path.name == WARM_BUNDLE else ""),
        "bytes": len(raw),
        "mb": round(len(raw) / 1e6, 2),
        "entries": len(orjson.loads(raw)["entry"]),
        "post_median_ms": round(statistics.median(posts) * 1000, 1),
        "post_max_ms": round(max(posts) * 1000, 1),
        "post_first_ms": round(posts[0] * 1000, 1),
        "results": _result_count(client, services.api_url, mrn),
        "delivered_s": round(delivered, 2),
    }
    if opts.baselines:
        from ehrbridge.bench.naive import naive_bundle_ingest

        naive = [naive_bundle_ingest(raw, services.fhir_base) for _ in range(min(rounds, 2))]
        row["naive_ms"] = round(statistics.median(naive) * 1000, 1)
        row["naive_vs_ours"] = ratio(row["naive_ms"], row["post_median_ms"])
    if opts.floor:
        floor = kafka_floor(kafka_bootstrap(), rate=0, seconds=0, payload=raw, count=rounds)
        row["floor_ms"] = floor["produce_to_consume_latency"]["p50_ms"]
    return row


# ---------------------------------------------------------------- backfill --

BACKFILL_TARGET_PER_S = 5000  # issue 16: history needs no MLLP or ACK


def backfill(opts: Options) -> dict[str, Any]:
    """Renal ORU^R01 history replayed by `ehrbridge backfill` (stage + model server)."""
    from ehrbridge.adapters.evaluation_sources import stored_predictions
    from ehrbridge.backfill import BATCH, MODEL_BATCH, run_backfill
    from ehrbridge.bench.load import SenderSpec, build_messages

    count = int(opts.pick(20000, 500))
    spec = SenderSpec(0, 1, 0, 0.0, 0.0, count, "BF")
    history = opts.run_dir / "backfill-history.hl7"
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_bytes(b"\n".join(payload for _, payload in build_messages(spec)))
    with Services(opts.run_dir / "backfill") as services:
        services.start_servers("model")
        # No FHIR server: a port nothing listens on, since backfill writes nothing back.
        services.ports["fhir"] = free_port()
        site = services.write_site_config(updates={"mode": "shadow"})
        cpu, wall = time.process_time(), time.perf_counter()
        args = argparse.Namespace(
            site=site, source=history, batch=BATCH, model_batch=MODEL_BATCH, max_inputs=None
        )
        code = run_backfill(args)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stored = stored_predictions(
            services.run_dir / "data-site" / "evaluation" / "results.sqlite", "kfre-4var"
        )
    if code != 0:
        raise RuntimeError(f"backfill exited {code}")
    result: dict[str, Any] = {
        "params": _params(opts, messages=count, batch=BATCH, model_batch=MODEL_BATCH),
        "messages": count,
        "predictions": len(stored),
        "seconds": round(wall, 2),
        "cpu_s": round(cpu, 2),  # this process only; the model server is another
        "messages_per_s": round(count / wall),
        "messages_per_cpu_s": round(count / cpu) if cpu else None,
        "target_per_s": BACKFILL_TARGET_PER_S,
    }
    result["vs_target"] = ratio(result["messages_per_s"], BACKFILL_TARGET_PER_S)
    headers = ["messages", "predictions", "wall s", "msg/s", "CPU s", "msg/CPU-s",
               "target msg/s", "msg/s / target"]  # fmt: skip
    result["table"] = (
        headers,
        [
            [
                count,
                len(stored),
                result["seconds"],
                result["messages_per_s"],
                result["cpu_s"],
                result["messages_per_cpu_s"],
                BACKFILL_TARGET_PER_S,
                result["vs_target"],
            ]
        ],
    )
    return result


# -------------------------------------------------------------------- util --


def _params(opts: Options, **values: Any) -> dict[str, Any]:
    return {
        "transport": opts.transport,
        "split": opts.split,
        "senders": opts.senders,
        "smoke": opts.smoke,
        "model_latency_ms": opts.model_latency.request_ms,
        "model_row_latency_ms": opts.model_latency.row_ms,
        **values,
    }


def search(opts: Options) -> dict[str, Any]:
    """The console's message search (bench/search.py): 1,000,000 stored messages."""
    from ehrbridge.bench.search import search_bench

    messages = 20_000 if opts.smoke else 1_000_000
    result = search_bench(
        opts.run_dir,
        messages,
        searches=20 if opts.smoke else 200,
        baseline_searches=2 if opts.smoke else 10,
    )
    headers = ["search (page of 50 + total)", "p50 ms", "p95 ms", "p99 ms", "full scan p95 ms"]
    rows: list[Row] = [
        [name, got["p50_ms"], got["p95_ms"], got["p99_ms"], result["naive"][name]["p95_ms"]]
        for name, got in result["ehrbridge"].items()
    ]
    every = result["all"]
    rows.append(
        ["all searches", every["p50_ms"], every["p95_ms"], every["p99_ms"],
         result["naive_all"]["p95_ms"]]
    )  # fmt: skip
    result["table"] = (headers, rows)
    return result


SCENARIOS: dict[str, Callable[[Options], dict[str, Any]]] = {
    "ingest": ingest,
    "e2e": e2e,
    "stages": stages,
    "scale": scale,
    "cds": cds,
    "fhir-bundle": fhir_bundle,
    "backfill": backfill,
    "search": search,
}
