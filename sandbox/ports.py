"""The sandbox's fixed local ports: a light module, so the CLI can offer a flag per port."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Ports:
    mllp: int = 2575
    http: int = 8080
    fhir: int = 8090
    model: int = 8091
    fhir_site_http: int = 8081  # the FHIR site's API: FHIR ingest, CDS Hooks
    fhir_site_mllp: int = 2577
    ehr_inbox: int = 2576  # the EHR's HL7v2 results inbox (ORU write-back)

    @classmethod
    def free(cls) -> Ports:
        """Let the OS choose every port (tests)."""
        return cls(0, 0, 0, 0, 0, 0, 0)


# What listens on each port: the `ehrbridge sandbox --*-port` help texts.
PORT_ROLES = {
    "mllp": "MLLP listener of the sandbox site: send HL7v2 here",
    "http": "ehrbridge HTTP API of the sandbox site (/api/results, /health)",
    "fhir": "FHIR R4 server standing in for the EHR (risk Observations land here)",
    "model": "KFRE model server (Open Inference Protocol v2)",
    "fhir_site_http": "the FHIR site's API: FHIR ingest (/fhir) and CDS Hooks",
    "fhir_site_mllp": "the FHIR site's MLLP listener",
    "ehr_inbox": "the EHR's HL7v2 results inbox (ORU^R01 write-back)",
}
