"""The naive baseline: what a straightforward integration would do with the same traffic.

Run beside ehrbridge in every scenario, on the same machine and the same
servers, so the comparison is like for like:

* **hl7apy full parse** of every message (``find_groups=True``) and an ACK
  built with hl7apy;
* **fhir.resources models on the hot path**: each Observation is validated as
  an R4B ``Observation`` model and serialised by it;
* **one HTTP call per record, no batching**: one model call per message (OIP
  v2, a batch of one) and one FHIR conditional update per Observation;
* everything synchronous, in the order a message arrives, one thread per
  MLLP connection; in ``ingest`` mode a message is parsed, appended to a
  file and fsynced before its AA, one by one (no group commit).

    python -m ehrbridge.bench.naive ingest|e2e --port P --data DIR [--model URL --fhir URL]

It reads the same sandbox messages (the sandbox site's codes and units) and
computes the KFRE features from the message alone. ``create_naive_cds_app``
is the naive CDS Hooks service: every chart opening searches the EHR for the
patient's risk Observations and parses the Bundle with fhir.resources.

fhir.resources is an optional dependency (``pip install 'ehrbridge[bench]'``;
``scripts/bootstrap`` installs it): the product never imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socketserver
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request  # module level: FastAPI resolves the annotation

from ehrbridge.mappings.ckd_epi import egfr_ckd_epi_2021

START, END = b"\x0b", b"\x1c\x0d"
PATIENT_SYSTEM = "urn:ehrbridge:sandbox:mrn"
CREATININE = {"2160-0", "38483-4"}
EGFR = {"33914-3", "62238-1", "98979-8", "48642-3"}
UACR = {"9318-7", "14959-1", "32294-1"}
UACR_TO_MG_G = {"mg/g": 1.0, "mg/g{creat}": 1.0, "mg/mmol": 8.84}


# ------------------------------------------------------------ HL7v2 path --


def hl7apy_parse(raw: bytes) -> Any:
    """The full hl7apy parse: structure, groups, every segment and field."""
    from hl7apy.parser import parse_message

    return parse_message(raw.decode("utf-8"), find_groups=True)


def segments(element: Any) -> Iterator[Any]:
    for child in element.children:
        if child.classname == "Segment":
            yield child
        else:
            yield from segments(child)


def _number(text: str) -> float:
    # "<3", ">90", ">^90": the bound is the value (a naive reading).
    return float(text.replace("^", "").lstrip("<>="))


def naive_features(message: Any) -> dict[str, Any]:
    """Age, sex, eGFR and UACR from this one message, by walking hl7apy's tree."""
    found: dict[str, Any] = {"refs": []}
    control_id = message.msh.msh_10.to_er7()
    obx_count = 0
    for segment in segments(message):
        if segment.name == "PID":
            found["mrn"] = next(
                r.to_er7().split("^")[0] for r in segment.pid_3 if "^SANDBOX^" in r.to_er7()
            )
            found["birth"] = segment.pid_7.to_er7()[:8]
            found["male"] = segment.pid_8.to_er7() == "M"
        elif segment.name == "OBX":
            obx_count += 1
            _read_obx(segment, found, f"{control_id}/OBX/{obx_count}")
    birth = date(int(found["birth"][:4]), int(found["birth"][4:6]), int(found["birth"][6:8]))
    found["age"] = (found["when"].date() - birth).days / 365.2425
    if "egfr" not in found:
        found["egfr"] = egfr_ckd_epi_2021(found["creatinine"], found["age"], not found["male"])
    found["control_id"] = control_id
    return found


def _read_obx(obx: Any, found: dict[str, Any], ref: str) -> None:
    code = obx.obx_3.obx_3_1.to_er7()
    if code not in CREATININE | EGFR | UACR:
        return
    value = _number(obx.obx_5.to_er7())
    unit = obx.obx_6.obx_6_1.to_er7()
    found["when"] = datetime.strptime(obx.obx_14.to_er7()[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    found["refs"].append(ref)
    if code in CREATININE:
        found["creatinine"] = value / 88.4 if unit == "umol/L" else value
    elif code in EGFR:
        found["egfr"] = value
    else:
        found["uacr"] = value * UACR_TO_MG_G[unit]


def hl7apy_ack(message: Any, code: str = "AA") -> bytes:
    from hl7apy.core import Message

    ack = Message("ACK", version="2.5.1")
    ack.msh.msh_3 = "EHRBRIDGE"
    ack.msh.msh_5 = message.msh.msh_3.to_er7()
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = "ACK" + message.msh.msh_10.to_er7()
    ack.msa.msa_1 = code
    ack.msa.msa_2 = message.msh.msh_10.to_er7()
    return str(ack.to_er7()).encode()


MISSING_FHIR_RESOURCES = (
    "the naive baseline needs fhir.resources, an optional dependency: "
    "pip install 'ehrbridge[bench]' (scripts/bootstrap installs it), or pass --no-naive"
)


def can_run() -> bool:
    """Whether fhir.resources, which only the naive baseline uses, is installed."""
    return importlib.util.find_spec("fhir.resources") is not None


def fhir_resources_observation(features: dict[str, Any], risks: tuple[float, float]) -> str:
    """The risk Observation as a validated fhir.resources R4B model, serialised by it."""
    from fhir.resources.R4B.observation import Observation

    identifier = f"{features['mrn']}-{features['when'].date().isoformat()}"
    observation = Observation.model_validate(
        {
            "resourceType": "Observation",
            "identifier": [{"system": "urn:naive:prediction", "value": identifier}],
            "status": "final",
            "code": {"coding": [{"system": "urn:ehrbridge:codes", "code": "kfre-4var"}]},
            "subject": {"identifier": {"system": PATIENT_SYSTEM, "value": features["mrn"]}},
            "effectiveDateTime": features["when"].isoformat(),
            "derivedFrom": [
                {"identifier": {"system": "urn:ehrbridge:naive:fact", "value": ref}}
                for ref in features["refs"]
            ],
            "component": [
                {
                    "code": {"coding": [{"system": "urn:ehrbridge:codes", "code": code}]},
                    "valueQuantity": {
                        "value": round(risk * 100, 4),
                        "unit": "%",
                        "system": "http://unitsofmeasure.org",
                        "code": "%",
                    },
                }
                for code, risk in (("kfre-risk-2y", risks[0]), ("kfre-risk-5y", risks[1]))
            ],
        }
    )
    return str(observation.model_dump_json(exclude_none=True))


def infer_one(
    client: httpx.Client, model_url: str, features: dict[str, Any]
) -> tuple[float, float]:
    """One OIP v2 request for one record."""
    body = {
        "parameters": {"calibration": "north_american"},
        "inputs": [
            {"name": "age", "shape": [1], "datatype": "FP64", "data": [features["age"]]},
            {"name": "male", "shape": [1], "datatype": "BOOL", "data": [features["male"]]},
            {"name": "egfr", "shape": [1], "datatype": "FP64", "data": [features["egfr"]]},
            {"name": "uacr", "shape": [1], "datatype": "FP64", "data": [features["uacr"]]},
        ],
    }
    response = client.post(f"{model_url}/v2/models/kfre-4var/infer", json=body)
    response.raise_for_status()
    outputs = {o["name"]: o["data"][0] for o in response.json()["outputs"]}
    return float(outputs["risk_2y"]), float(outputs["risk_5y"])


def put_observation(client: httpx.Client, fhir_base: str, mrn_day: str, body: str) -> None:
    """One FHIR conditional update per Observation."""
    response = client.put(
        f"{fhir_base}/Observation",
        params={"identifier": f"urn:naive:prediction|{mrn_day}"},
        content=body,
        headers={"content-type": "application/fhir+json"},
    )
    response.raise_for_status()


class NaivePipeline:
    """The per-message work, for both modes."""

    def __init__(self, mode: str, data_dir: Path, model_url: str, fhir_base: str) -> None:
        self.mode = mode
        self.model_url = model_url
        self.fhir_base = fhir_base
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = (data_dir / "naive-ingest.hl7").open("ab")
        self._lock = threading.Lock()

    def handle(self, raw: bytes, client: httpx.Client) -> bytes:
        message = hl7apy_parse(raw)
        if self.mode == "ingest":
            with self._lock:  # one durable write per message
                self._log.write(raw + b"\n")
                self._log.flush()
                os.fsync(self._log.fileno())
            return hl7apy_ack(message)
        features = naive_features(message)
        risks = infer_one(client, self.model_url, features)
        body = fhir_resources_observation(features, risks)
        mrn_day = f"{features['mrn']}-{features['when'].date().isoformat()}"
        put_observation(client, self.fhir_base, mrn_day, body)
        return hl7apy_ack(message)


def serve(pipeline: NaivePipeline, port: int) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            buffer = b""
            with httpx.Client(timeout=30) as client:
                while True:
                    chunk = self.request.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    while END in buffer:
                        frame, buffer = buffer.split(END, 1)
                        ack = pipeline.handle(frame[frame.index(START) + 1 :], client)
                        self.request.sendall(START + ack + END)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler) as server:
        server.serve_forever()


# ------------------------------------------------------------ FHIR bundle --


def naive_bundle_ingest(raw: bytes, fhir_base: str) -> float:
    """Seconds to validate a whole Bundle with fhir.resources and store each entry by itself."""
    from fhir.resources.R4B.bundle import Bundle

    started = time.perf_counter()
    bundle = Bundle.model_validate_json(raw)
    with httpx.Client(timeout=30) as client:
        for entry in bundle.entry or []:
            resource = entry.resource
            if resource is None:
                continue
            response = client.post(
                f"{fhir_base}/{resource.get_resource_type()}",
                content=resource.model_dump_json(exclude_none=True),
                headers={"content-type": "application/fhir+json"},
            )
            response.raise_for_status()
    return time.perf_counter() - started


# -------------------------------------------------------------- CDS Hooks --


def create_naive_cds_app(fhir_base: str, patient_system: str) -> Any:
    """patient-view answered by reading the EHR each time, through fhir.resources.

    ``context.patientId`` is taken as the patient's identifier in ``patient_system``.
    """
    from fastapi import FastAPI
    from fhir.resources.R4B.bundle import Bundle

    app = FastAPI()
    client = httpx.Client(timeout=10)

    @app.post("/cds-services/kfre-patient-view")
    async def patient_view(request: Request) -> dict[str, Any]:
        body = await request.json()
        patient = body["context"]["patientId"]
        response = client.get(
            f"{fhir_base}/Observation",
            params={"patient.identifier": f"{patient_system}|{patient}", "_count": 100},
        )
        bundle = Bundle.model_validate_json(response.content)
        resources: list[Any] = [e.resource for e in bundle.entry or []]
        latest = max(resources, key=lambda r: str(r.effectiveDateTime), default=None)
        if latest is None:
            return {"cards": []}
        risks = [c.valueQuantity.value for c in latest.component or []]
        summary = f"Kidney failure risk {risks[0]}% in 2 years, {risks[1]}% in 5 years (KFRE)"
        return {"cards": [{"summary": summary, "indicator": "info", "source": {"label": "naive"}}]}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["ingest", "e2e"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--fhir", default="")
    args = parser.parse_args(argv)
    serve(NaivePipeline(args.mode, args.data, args.model, args.fhir), args.port)


if __name__ == "__main__":
    main()
