"""Promotion and demotion: judged on evidence, recorded in the audit trail, switched live.

- ``ehrbridge promote`` refuses a miscalibrated model (risks x2) and goes live
  on a calibrated one; an override needs a reason and is recorded with it; a
  demotion needs a reason. Every decision is a hash-chained audit entry with
  the criteria's verdicts and the SHA-256 of the evaluation judged.
- Over the HTTP API, a viewer and an operator get 403 and nothing switches.
- While HL7v2 flows over real MLLP, a promotion switches the running site:
  before it nothing reaches the EHR (the sandbox's FHIR server), after it
  every result does, and no message is lost or scored twice across the switch.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from auth_tokens import headers
from conftest import wait_for
from test_evaluate_cli import Patient, run, site_file

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.audit import AuditTrail
from ehrbridge.cli import main
from ehrbridge.config import Mode, PromotionCriteria, SiteConfig, load_site_config
from ehrbridge.promotion import effective_mode, mode_path
from ehrbridge.sandbox.run import BackgroundSandbox, sandbox_site_file
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

MODEL = "kfre-4var"


def decisions(data_dir: Path) -> list[dict[str, Any]]:
    return [e for e in AuditTrail(data_dir / "audit").entries() if e["action"].endswith(MODEL)]


def shadow_site(tmp: Path) -> Path:
    """The evaluated site's file, in shadow (the sandbox's is live)."""
    path = tmp / "site.yaml"
    path.write_text(path.read_text().replace("mode: live", "mode: shadow"))
    return path


def promote(site: Path, *extra: str) -> int:
    return main(["promote", "--site", str(site), "--local", *extra])


@pytest.fixture(scope="module")
def small_cohort() -> list[Patient]:
    from test_evaluate_cli import add_special_cases, make_cohort

    people = make_cohort(1500, seed=5)
    add_special_cases(people)
    return people


def test_a_miscalibrated_model_is_refused_and_an_override_is_recorded(
    tmp_path: Path, small_cohort: list[Patient], capsys: pytest.CaptureFixture[str]
) -> None:
    run(tmp_path, small_cohort, 2.0, capsys)  # risks x2: the criteria fail
    site, data = shadow_site(tmp_path), tmp_path / "data"
    config = load_site_config(site)
    assert promote(site) == 1
    printed = capsys.readouterr().out
    assert "calibration_slope: fail" in printed and "promote refused" in printed
    assert effective_mode(config) is Mode.SHADOW and not mode_path(data, MODEL).exists()
    [refused] = decisions(data)
    assert refused["outcome"] == "refused" and refused["detail"]["overall"] == "fail"
    judged = data / "evaluation" / f"{MODEL}.site.json"
    evidence = refused["detail"]["evidence"]
    assert evidence["sha256"] == hashlib.sha256(judged.read_bytes()).hexdigest()
    assert evidence["report"] == str((tmp_path / "report" / "report.html").resolve())
    statuses = {c["criterion"]: c["status"] for c in refused["detail"]["criteria"]}
    assert statuses["calibration_slope"] == "fail"

    assert promote(site, "--override") == 1  # an override without its reason is refused
    assert effective_mode(config) is Mode.SHADOW
    reason = "pilot ward, recalibration pending; approved by the model owner"
    assert promote(site, "--override", "--reason", reason) == 0
    assert effective_mode(config) is Mode.LIVE
    overridden = decisions(data)[-1]
    assert overridden["outcome"] == "live" and overridden["detail"]["override"] is True
    assert overridden["detail"]["reason"] == reason and overridden["who"].startswith("cli:")
    switch = orjson.loads(mode_path(data, MODEL).read_bytes())
    assert switch["audit_seq"] == overridden["seq"] and switch["audit_hash"] == overridden["hash"]

    assert main(["demote", "--site", str(site), "--local"]) == 1  # no reason: refused
    assert effective_mode(config) is Mode.LIVE
    assert main(["demote", "--site", str(site), "--local", "--reason", "AUROC fell"]) == 0
    assert effective_mode(config) is Mode.SHADOW
    assert [d["outcome"] for d in decisions(data)] == [
        "refused",
        "refused",
        "live",
        "refused",
        "shadow",
    ]
    assert AuditTrail(data / "audit").verify().intact


def test_a_calibrated_model_passes_and_goes_live(
    tmp_path: Path, small_cohort: list[Patient], capsys: pytest.CaptureFixture[str]
) -> None:
    run(tmp_path, small_cohort, 1.0, capsys)
    site = site_file(tmp_path, CRITERIA_FOR_1500)
    site.write_text(site.read_text().replace("mode: live", "mode: shadow"))
    assert promote(site) == 0
    printed = capsys.readouterr().out
    assert "criteria: pass" in printed and f"{MODEL} is now live (was shadow)" in printed
    [decision] = decisions(tmp_path / "data")
    assert decision["detail"]["overall"] == "pass" and decision["detail"]["override"] is False
    assert effective_mode(load_site_config(site)) is Mode.LIVE


CRITERIA_FOR_1500 = """
evaluation:
  promotion:
    min_days: 30
    min_scored_patients: 1000
    min_auroc_lower_ci: 0.6
    calibration_slope: [0.7, 1.3]
"""


def test_no_evaluation_is_inconclusive_and_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir(mode=0o700)
    site = site_file(tmp_path, CRITERIA_FOR_1500)
    assert promote(site) == 1
    [decision] = decisions(tmp_path / "data")
    assert decision["detail"]["overall"] == "inconclusive"
    assert "run ehrbridge evaluate" in decision["detail"]["evidence"]["why"]


# --- the running site: roles, and a switch under traffic over real MLLP ---------------


def in_shadow(config: SiteConfig) -> SiteConfig:
    return config.model_copy(update={"mode": Mode.SHADOW})


@pytest.fixture(scope="module")
def shadow_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with BackgroundSandbox(
        tmp_path_factory.mktemp("promote"), configure=in_shadow, fhir_site=False
    ) as running:
        yield running


def mode_url(running: BackgroundSandbox) -> str:
    return f"{running.sandbox.api_url}/api/models/{MODEL}/mode"


def test_a_viewer_or_operator_cannot_promote(shadow_sandbox: BackgroundSandbox) -> None:
    body = {"mode": "live", "override": True, "reason": "trying"}
    for role in ("viewer", "operator", "sender"):
        answer = httpx.post(
            mode_url(shadow_sandbox), json=body, headers=headers(shadow_sandbox, role)
        )
        assert answer.status_code == 403, (role, answer.text)
    assert httpx.post(mode_url(shadow_sandbox), json=body).status_code == 401
    current = httpx.get(mode_url(shadow_sandbox), headers=headers(shadow_sandbox, "viewer"))
    assert current.json()["mode"] == "shadow" and current.json()["decision"] is None
    runtime = shadow_sandbox.sandbox.runtime
    assert runtime is not None
    attempts = [e for e in runtime.audit.entries() if e["action"].startswith("POST /api/models")]
    assert sorted(e["outcome"] for e in attempts)[-3:] == [403, 403, 403]


def renal_oru(mrn: str, control_id: str) -> bytes:
    return SyntheticEhr(patients=1).renal_oru_for(
        age=61,
        female=False,
        at=datetime.now(UTC) - timedelta(days=2),
        egfr=35.0,
        uacr_mg_g=250.0,
        mrn=mrn,
        control_id=control_id,
    )


def ehr_observations(running: BackgroundSandbox) -> int:
    store = running.sandbox.fhir_store
    assert store is not None
    return store.counts().get("Observation", 0)


def test_promotion_under_mllp_traffic_loses_nothing_and_scores_nothing_twice(
    shadow_sandbox: BackgroundSandbox,
) -> None:
    running, api = shadow_sandbox, shadow_sandbox.sandbox.api_url
    viewer, admin = headers(running, "viewer"), headers(running, "admin")
    run_id = uuid.uuid4().hex[:6]
    patients = [f"P{run_id}{i:03d}" for i in range(60)]
    first, rest = patients[:20], patients[20:]
    acked: dict[str, float] = {}
    before_observations = ehr_observations(running)

    def send(mrns: list[str]) -> None:
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            for mrn in mrns:
                assert client.send(renal_oru(mrn, f"C{mrn}")).code == "AA"
                acked[mrn] = datetime.now(UTC).timestamp()

    def results_of(mrn: str) -> list[dict[str, Any]]:
        found = httpx.get(f"{api}/api/results", params={"patient": mrn}, headers=viewer)
        return found.json()["results"]

    send(first)
    wait_for(lambda: all(results_of(m) for m in first), timeout_s=60, what="shadow results")
    assert ehr_observations(running) == before_observations  # shadow: nothing to the EHR

    sender = threading.Thread(target=send, args=(rest,))
    sender.start()  # traffic flows while the switch happens
    wait_for(lambda: len(acked) >= 30, what="traffic under way")
    body = {"mode": "live", "override": True, "reason": "switch under traffic (test)"}
    switched = httpx.post(mode_url(running), json=body, headers=admin)
    switched_at = datetime.now(UTC).timestamp()
    assert switched.status_code == 200, switched.text
    sender.join(60)
    assert len(acked) == len(patients)

    def all_scored() -> bool:
        return all(results_of(m) for m in patients)

    wait_for(all_scored, timeout_s=90, what="every message scored")
    stored = {m: results_of(m) for m in patients}
    assert all(len(r) == 1 for r in stored.values()), "a message scored twice or not at all"
    after = [m for m in patients if acked[m] > switched_at]
    assert after, "no message was sent after the switch"

    def after_delivered() -> bool:
        return all(results_of(m)[0]["status"] == "delivered" for m in after)

    wait_for(after_delivered, timeout_s=60, what="results after the switch in the EHR")
    statuses = {m: results_of(m)[0]["status"] for m in patients}
    assert all(statuses[m] == "shadow" for m in first)  # never written after the fact
    delivered = [m for m in patients if statuses[m] == "delivered"]
    assert set(statuses.values()) <= {"shadow", "delivered"}
    assert ehr_observations(running) - before_observations == len(delivered)
    health = httpx.get(f"{api}/health").json()
    assert health["mode"] == "live"
    metrics = httpx.get(f"{api}/metrics", headers=viewer).text
    live = [
        line
        for line in metrics.splitlines()
        if line.startswith("ehrbridge_predictions_total") and 'mode="live"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in live) >= len(after)


def latest_at_promotion(config: SiteConfig) -> SiteConfig:
    promotion = PromotionCriteria(min_scored_patients=1000, shadow_results="latest")
    evaluation = config.evaluation.model_copy(update={"promotion": promotion})
    return config.model_copy(update={"mode": Mode.SHADOW, "evaluation": evaluation})


def test_latest_shadow_results_are_written_at_promotion_when_still_latest_and_in_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with BackgroundSandbox(
        tmp_path / "site", configure=latest_at_promotion, fhir_site=False
    ) as running:
        api, viewer = running.sandbox.api_url, headers(running, "viewer")
        now = datetime.now(UTC)
        sent = [  # (patient, days ago, eGFR): two episodes for A; B left the domain since
            ("A", 20, 35.0),
            ("A", 3, 33.0),
            ("B", 10, 40.0),
            ("B", 2, 71.9),
            ("C", 5, 30.0),
        ]
        run_id = uuid.uuid4().hex[:6]
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            for i, (who, days, egfr) in enumerate(sent):
                message = SyntheticEhr(patients=1).renal_oru_for(
                    age=58,
                    female=True,
                    at=now - timedelta(days=days),
                    egfr=egfr,
                    uacr_mg_g=200.0,
                    mrn=f"{who}{run_id}",
                    control_id=f"L{run_id}{i}",
                )
                assert client.send(message).code == "AA"

        def results_of(who: str) -> list[dict[str, Any]]:
            params = {"patient": f"{who}{run_id}"}
            return httpx.get(f"{api}/api/results", params=params, headers=viewer).json()["results"]

        def states() -> dict[str, list[str]]:
            return {who: [r["status"] for r in results_of(who)] for who in "ABC"}

        wait_for(
            lambda: states() == {"A": ["shadow"] * 2, "B": ["shadow"], "C": ["shadow"]},
            timeout_s=60,
            what="shadow results",
        )
        wait_for(
            lambda: (
                httpx.get(f"{api}/api/patients/B{run_id}", headers=viewer)
                .json()["last_outcome"]
                .get("out_of_domain")
            ),
            what="B out of domain",
        )
        assert ehr_observations(running) == 0
        code = main(
            [
                "promote",
                "--site",
                str(sandbox_site_file()),
                "--url",
                api,
                "--token-file",
                str(running.sandbox.data_dir / "tokens" / "admin"),
                "--override",
                "--reason",
                "criteria inconclusive: pilot approved",
            ]
        )
        printed = capsys.readouterr().out
        assert code == 0, printed
        assert "criteria: inconclusive" in printed and "is now live" in printed
        assert "shadow results (latest): 2 written" in printed, printed
        # A's newest and C's: delivered; A's older episode and B (now outside) stay shadow.
        wait_for(
            lambda: states() == {"A": ["delivered", "shadow"], "B": ["shadow"], "C": ["delivered"]},
            timeout_s=60,
            what="catch-up",
        )
        assert ehr_observations(running) == 2
        entries = [
            e
            for e in running.sandbox.runtime.audit.entries()  # type: ignore[union-attr]
            if e["action"] == f"promote shadow results {MODEL}"
        ]
        shadow = entries[-1]["detail"]["evidence"]["shadow_results"]
        assert shadow == {
            "setting": "latest",
            "written": 2,
            "skipped": {"outside the model's domain now": 1},
        }


def test_promote_can_run_the_evaluation_it_judges(
    tmp_path: Path, small_cohort: list[Patient], capsys: pytest.CaptureFixture[str]
) -> None:
    from test_evaluate_cli import CRITERIA, store_predictions, write_export

    (tmp_path / "data").mkdir(mode=0o700)
    store_predictions(tmp_path / "data", small_cohort, 2.0)  # risks x2
    write_export(tmp_path / "export", small_cohort)
    site_file(tmp_path, CRITERIA)
    site, out = shadow_site(tmp_path), tmp_path / "fresh"
    code = promote(site, "--evaluate", str(out), "--events", str(tmp_path / "export"))
    printed = capsys.readouterr().out
    assert code == 1 and "over-predicts" in printed and "promote refused" in printed
    [decision] = decisions(tmp_path / "data")
    evidence = decision["detail"]["evidence"]
    assert evidence["report"] == str((out / "report.html").resolve())
    assert evidence["sha256"] == hashlib.sha256((out / "evaluation.json").read_bytes()).hexdigest()

    assert main(["promote", "--site", str(site), "--local", "--override", "--reason", "r"]) == 0
    capsys.readouterr()
    assert main(["config", "check", str(site)]) == 0
    assert "mode in force: live, by the last promote/demote" in capsys.readouterr().out


def demote_on_drift(config: SiteConfig) -> SiteConfig:
    promotion = PromotionCriteria(demote_on_alerts=["EhrbridgeFeatureDrift"])
    return config.model_copy(
        update={"evaluation": config.evaluation.model_copy(update={"promotion": promotion})}
    )


def webhook(status: str, *alerts: tuple[str, str]) -> dict[str, Any]:
    """An Alertmanager webhook body (version 4) with (alertname, status) alerts."""
    return {
        "version": "4",
        "status": status,
        "receiver": "ehrbridge-demote",
        "groupLabels": {},
        "alerts": [
            {"status": s, "labels": {"alertname": name, "site": "sandbox"}, "annotations": {}}
            for name, s in alerts
        ],
    }


def test_a_listed_alert_from_alertmanager_demotes_a_live_model(tmp_path: Path) -> None:
    with BackgroundSandbox(tmp_path, configure=demote_on_drift, fhir_site=False) as running:
        api, admin = running.sandbox.api_url, headers(running, "admin")
        url = f"{api}/api/models/{MODEL}/alerts"
        other = webhook("firing", ("EhrbridgeFeedSilent", "firing"))
        resolved = webhook("resolved", ("EhrbridgeFeatureDrift", "resolved"))
        for body in (other, resolved):
            assert httpx.post(url, json=body, headers=admin).json()["demoted"] is False
        firing = webhook("firing", ("EhrbridgeFeatureDrift", "firing"))
        assert httpx.post(url, json=firing, headers=headers(running, "operator")).status_code == 403
        assert httpx.get(f"{api}/health").json()["mode"] == "live"
        answer = httpx.post(url, json=firing, headers=admin).json()
        assert answer == {"demoted": True, "firing": ["EhrbridgeFeatureDrift"]}
        assert httpx.get(f"{api}/health").json()["mode"] == "shadow"
        [decision] = decisions(running.sandbox.data_dir)
        assert decision["outcome"] == "shadow"
        assert decision["detail"]["reason"] == "alert firing: EhrbridgeFeatureDrift"

        before = ehr_observations(running)
        mrn = f"D{uuid.uuid4().hex[:8]}"
        with MllpClient("127.0.0.1", running.sandbox.mllp_port) as client:
            assert client.send(renal_oru(mrn, f"C{mrn}")).code == "AA"
        viewer = headers(running, "viewer")

        def result() -> list[dict[str, Any]]:
            params = {"patient": mrn}
            return httpx.get(f"{api}/api/results", params=params, headers=viewer).json()["results"]

        [after] = wait_for(result, what="a result after the demotion")
        assert after["status"] == "shadow" and ehr_observations(running) == before


def test_the_cli_promotes_and_demotes_the_second_model_of_a_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ehrbridge promote --model`` takes any of the site's models, each its own mode file."""
    import yaml
    from test_several_models import toy_model

    from ehrbridge.cli import main
    from ehrbridge.sandbox.run import sandbox_site_file

    toy = tmp_path / "progression-toy.yaml"
    toy.write_text(toy_model())
    data = yaml.safe_load(sandbox_site_file().read_text())
    data["mode"], data["data_dir"] = "shadow", str(tmp_path / "data")
    data["models"] = [data.pop("model"), {**data_model_for(toy)}]
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump(data))
    (tmp_path / "data").mkdir(mode=0o700)
    promote = ["promote", "--site", str(site), "--local", "--model", "progression-toy"]
    assert main([*promote, "--override", "--reason", "pilot"]) == 0
    written = orjson.loads(mode_path(tmp_path / "data", "progression-toy").read_bytes())
    assert written["mode"] == "live"
    assert not mode_path(tmp_path / "data", "kfre-4var").exists()
    assert main(["promote", "--site", str(site), "--local", "--model", "x"]) != 0
    assert "this site runs kfre-4var, progression-toy, not 'x'" in capsys.readouterr().err
    demote = ["demote", "--site", str(site), "--local", "--model", "progression-toy"]
    assert main([*demote, "--reason", "pilot over"]) == 0
    actions = [e["action"] for e in AuditTrail(tmp_path / "data" / "audit").entries()]
    assert actions == ["promote progression-toy", "demote progression-toy"]


def data_model_for(toy: Path) -> dict[str, Any]:
    return {"file": str(toy), "url": "http://127.0.0.1:9", "calibration": "north_american"}
