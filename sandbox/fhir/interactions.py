"""The RESTful interactions planned against the store, then applied."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

from ehrbridge.sandbox.fhir.errors import FhirProblem, bad_request
from ehrbridge.sandbox.fhir.query import SearchQuery, parse_search
from ehrbridge.sandbox.fhir.search import SearchResult
from ehrbridge.sandbox.fhir.spec import short
from ehrbridge.sandbox.fhir.store import FhirStore
from ehrbridge.sandbox.fhir.validation import check_id, etag_version, validate_resource
from ehrbridge.sandbox.fhir.versions import StoredVersion

WriteKind = Literal["create", "update", "delete", "matched", "nothing"]


@dataclass(slots=True)
class Write:
    """A planned write, decided against the current state before anything changes."""

    kind: WriteKind  # matched: conditional create found one; nothing: delete without target
    resource_type: str
    id: str | None
    status: int
    resource: dict[str, Any] | None = None
    existing: StoredVersion | None = None
    identity: tuple[str, ...] | None = None  # what a transaction may touch only once

    @property
    def changes(self) -> bool:
        return self.kind in ("create", "update", "delete")


# When the request being served arrived, on the store's clock (set by the HTTP face).
REQUEST_STARTED: ContextVar[int | None] = ContextVar("fhir_request_started", default=None)


class Interactions:
    """The FHIR interactions on a store; the caller holds ``store.lock``."""

    def __init__(self, store: FhirStore, default_count: int, max_count: int) -> None:
        self.store = store
        self.default_count = default_count
        self.max_count = max_count

    def parse(
        self, items: Iterable[tuple[str, str]], *, strict: bool = False, conditional: bool = False
    ) -> SearchQuery:
        return parse_search(
            items,
            default_count=self.default_count,
            max_count=self.max_count,
            strict=strict,
            conditional=conditional,
        )

    def matches(
        self, resource_type: str, criteria: str | Iterable[tuple[str, str]], what: str
    ) -> tuple[SearchQuery, SearchResult]:
        """Up to two matches of conditional ``criteria`` (``what`` names them in errors)."""
        if isinstance(criteria, str):
            # If-None-Exist / ifNoneExist carry the query part, sometimes with "Type?" in front.
            criteria = query_items(criteria.split("?", 1)[-1])
        try:
            query = self.parse(criteria, conditional=True)
        except FhirProblem as problem:
            raise bad_request(f"{what}: {problem.diagnostics}", code=problem.code) from None
        query.count = 2  # enough to tell one match from several
        return query, self.store.search(resource_type, query)

    def refuse_race(self, match: StoredVersion, what: str) -> None:
        """409 when ``match`` was created after this request arrived, as HAPI answers.

        HAPI JPA searches, then inserts; two requests with the same conditional
        create that overlap both find nothing, and the later insert breaks a
        unique index: 409 (HAPI-2745). Clients must retry it. Here a request
        is served atomically, so the overlap is judged by time: the match was
        created by another request while this one was in flight.
        """
        started = REQUEST_STARTED.get()
        if started is None:
            return
        created = self.store.history(match.resource_type, match.id)[0].last_updated_us
        if created > started:
            raise FhirProblem(
                409,
                "conflict",
                f"{what}: another request created the matching {match.resource_type} while "
                "this one was in flight; send it again (HAPI answers 409, HAPI-2745)",
            )

    @staticmethod
    def _several(resource_type: str, what: str, total: int) -> FhirProblem:
        return FhirProblem(
            412,
            "multiple-matches",
            f"{what} matches {total} {resource_type} resources; it must match at most one",
        )

    def plan_create(self, resource_type: str, resource: object, if_none_exist: str | None) -> Write:
        body = validate_resource(resource, resource_type)
        identity = None
        if if_none_exist is not None:
            query, found = self.matches(resource_type, if_none_exist, "If-None-Exist")
            if found.total > 1:
                raise self._several(resource_type, "If-None-Exist", found.total)
            if found.total == 1:
                existing = found.versions[0]
                self.refuse_race(existing, "If-None-Exist")
                return Write(
                    "matched",
                    resource_type,
                    existing.id,
                    200,
                    existing=existing,
                    identity=(resource_type, existing.id),
                )
            identity = ("?", resource_type, query.criteria_key())
        return Write(
            "create", resource_type, str(uuid.uuid4()), 201, resource=body, identity=identity
        )

    def plan_update(
        self, resource_type: str, resource_id: str, resource: object, if_match: str | None
    ) -> Write:
        check_id(resource_type, resource_id)
        body = validate_resource(resource, resource_type)
        body_id = body.get("id")
        if body_id != resource_id:
            shown = "has no id" if body_id is None else f"has id '{body_id}'"
            raise bad_request(
                f"the {resource_type} in the body {shown} but the URL names '{resource_id}'",
                expression=f"{resource_type}.id",
            )
        current = self.store.current(resource_type, resource_id)
        if if_match is not None and (
            current is None or current.deleted or str(current.version_id) != etag_version(if_match)
        ):
            have = "none" if current is None or current.deleted else current.etag
            raise FhirProblem(
                412,
                "conflict",
                f"If-Match {short(if_match)} does not match the current version of "
                f"{resource_type}/{resource_id} ({have})",
            )
        status = 201 if current is None or current.deleted else 200
        kind: WriteKind = "create" if status == 201 else "update"
        return Write(
            kind,
            resource_type,
            resource_id,
            status,
            resource=body,
            identity=(resource_type, resource_id),
        )

    def plan_conditional_update(
        self,
        resource_type: str,
        criteria: Iterable[tuple[str, str]],
        resource: object,
        if_match: str | None,
    ) -> Write:
        body = validate_resource(resource, resource_type)
        query, found = self.matches(resource_type, criteria, "conditional update")
        body_id = body.get("id")
        if found.total > 1:
            raise self._several(resource_type, "conditional update", found.total)
        if found.total == 1:
            self.refuse_race(found.versions[0], "conditional update")
            target = found.versions[0].id
            if body_id is not None and body_id != target:
                raise bad_request(
                    f"the body has id '{body_id}' but the criteria match {resource_type}/{target}",
                    expression=f"{resource_type}.id",
                )
            return self.plan_update(resource_type, target, {**body, "id": target}, if_match)
        if body_id is None:
            write = self.plan_create(resource_type, body, None)
            write.identity = ("?", resource_type, query.criteria_key())
            return write
        current = self.store.current(resource_type, body_id)
        if current is not None and not current.deleted:
            raise FhirProblem(
                409,
                "conflict",
                f"no {resource_type} matches the criteria, yet the body's id names the "
                f"existing {resource_type}/{body_id}",
            )
        return self.plan_update(resource_type, body_id, body, if_match)

    def plan_delete(self, resource_type: str, resource_id: str) -> Write:
        check_id(resource_type, resource_id)
        current = self.store.current(resource_type, resource_id)
        if current is None or current.deleted:
            # Deleting an absent resource succeeds without effect (R4 http.html#delete).
            return Write(
                "nothing",
                resource_type,
                resource_id,
                204,
                existing=current,
                identity=(resource_type, resource_id),
            )
        return Write(
            "delete", resource_type, resource_id, 204, identity=(resource_type, resource_id)
        )

    def plan_conditional_delete(
        self, resource_type: str, criteria: Iterable[tuple[str, str]]
    ) -> Write:
        _, found = self.matches(resource_type, criteria, "conditional delete")
        if found.total > 1:
            raise self._several(resource_type, "conditional delete", found.total)
        if found.total == 0:
            return Write("nothing", resource_type, None, 204)
        return self.plan_delete(resource_type, found.versions[0].id)

    def apply(self, write: Write) -> StoredVersion | None:
        if write.kind in ("create", "update"):
            assert write.id is not None
            return self.store.write(write.resource_type, write.id, write.resource)
        if write.kind == "delete":
            assert write.id is not None
            return self.store.write(write.resource_type, write.id, None)
        return write.existing

    def read(self, resource_type: str, resource_id: str) -> StoredVersion:
        current = self.store.current(resource_type, resource_id)
        if current is None:
            raise FhirProblem(
                404, "not-found", f"{resource_type}/{short(resource_id)} is not known"
            )
        if current.deleted:
            raise FhirProblem(
                410,
                "deleted",
                f"{resource_type}/{resource_id} was deleted (version {current.version_id})",
            )
        return current

    def vread(self, resource_type: str, resource_id: str, version_id: str) -> StoredVersion:
        history = self.store.history(resource_type, resource_id)
        if not history:
            raise FhirProblem(
                404, "not-found", f"{resource_type}/{short(resource_id)} is not known"
            )
        if not version_id.isdigit() or not 1 <= int(version_id) <= len(history):
            raise FhirProblem(
                404,
                "not-found",
                f"{resource_type}/{resource_id} has no version '{short(version_id)}'",
            )
        version = history[int(version_id) - 1]
        if version.deleted:
            raise FhirProblem(
                410,
                "deleted",
                f"version {version_id} of {resource_type}/{resource_id} is a deletion",
            )
        return version

    def history(self, resource_type: str, resource_id: str) -> list[StoredVersion]:
        versions = self.store.history(resource_type, resource_id)
        if not versions:
            raise FhirProblem(
                404, "not-found", f"{resource_type}/{short(resource_id)} is not known"
            )
        return versions


def query_items(query: str) -> list[tuple[str, str]]:
    return parse_qsl(query, keep_blank_values=True)
