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
