"""FHIR errors as OperationOutcomes: the stand-in's :class:`FhirProblem`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ehrbridge.adapters import fhir_http
from ehrbridge.pipelines.fhir_ingest import Issue
from ehrbridge.pipelines.fhir_ingest import operation_outcome as outcome_of


def operation_outcome(
    diagnostics: str,
    *,
    code: str = "processing",
    severity: str = "error",
    expression: str | None = None,
) -> dict[str, Any]:
    """An OperationOutcome with one issue (codes: http://hl7.org/fhir/issue-type)."""
    return outcome_of([Issue(code, diagnostics, expression, severity)])


class FhirProblem(fhir_http.FhirProblem):
    """An interaction failed; becomes an OperationOutcome with HTTP ``status``.

    The shared :class:`ehrbridge.adapters.fhir_http.FhirProblem`, built from
    its parts, and relocatable into a Bundle entry.
    """

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, Issue(code, diagnostics, expression), headers)
        self.code = code
        self.diagnostics = diagnostics
        self.expression = expression

    def in_entry(self, index: int) -> FhirProblem:
        """The same problem, located at ``Bundle.entry[index]``."""
        where = f"Bundle.entry[{index}]"
        expression = where
        if self.expression is not None:
            _, _, path = self.expression.partition(".")
            expression = f"{where}.resource.{path}" if path else f"{where}.resource"
        return FhirProblem(
            self.status,
            self.code,
            f"{where}: {self.diagnostics}",
            expression=expression,
            headers=self.headers,
        )


def bad_request(
    diagnostics: str, *, code: str = "invalid", expression: str | None = None
) -> FhirProblem:
    return FhirProblem(400, code, diagnostics, expression=expression)
