"""Site configuration: one YAML file per site deployment.

Every model here forbids unknown fields, so a typo is an error that names the
file, the line and the field (see ``ehrbridge.core.located_yaml``) instead of a setting
that silently does nothing. The annotated reference is ``docs/config.md``; the
sandbox's own file, ``sandbox/site.yaml``, is a complete working example.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ehrbridge.core.charsets import codec_for_charset
from ehrbridge.core.errors import ConfigError
from ehrbridge.core.located_yaml import (
    LocatedYaml,
    load_located,
    parse_located,
    validate_located,
)
from ehrbridge.mappings.model_file import ModelFile, builtin_model, load_model_file
from ehrbridge.mappings.schema import Mapping  # the mapping format: mappings/schema.py

_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Mode(StrEnum):
    SHADOW = "shadow"  # everything runs, results are kept locally, nothing reaches the EHR
    LIVE = "live"  # results are written to the EHR


class MessagePolicy(StrEnum):
    """What ingest does with an HL7v2 message type (``message_types``)."""

    ACCEPT = "accept"  # stored and processed: AA
    FILTER = "filter"  # AA, counted, neither stored nor dead-lettered
    REJECT = "reject"  # AR (HL7 table 0357: 200 or 201) and dead-lettered


# What ehrbridge reads (pipelines/facts.py): the only types a site may accept.
READABLE_MESSAGE_TYPES = frozenset({"ORU^R01", "ADT^*"})
# MSH-9.1^MSH-9.2 (three letters or digits each), TYPE^* for every trigger, * for every type.
_MESSAGE_TYPE_KEY = re.compile(r"^(?:[A-Z0-9]{3}\^(?:[A-Z0-9]{3}|\*)|\*)$")


def _readable(key: str) -> bool:
    return key in READABLE_MESSAGE_TYPES or (key[:3] == "ADT" and key != "*")


def check_message_types(table: dict[str, MessagePolicy]) -> dict[str, MessagePolicy]:
    for key, policy in table.items():
        if not _MESSAGE_TYPE_KEY.match(key):
            raise ValueError(f"{key!r}: write TYPE^TRIGGER (e.g. ORM^O01), TYPE^* or *")
        if policy is MessagePolicy.ACCEPT and not _readable(key):
            raise ValueError(
                f"{key!r}: ehrbridge reads only ORU^R01 and ADT messages; "
                "'filter' or 'reject' the others"
            )
    return table


class Calibration(StrEnum):
    NORTH_AMERICAN = "north_american"
    NON_NORTH_AMERICAN = "non_north_american"


def _relative_to_config(value: Path | None, info: ValidationInfo) -> Path | None:
    """A credential file path written in a site YAML is relative to that file."""
    located = (info.context or {}).get("located") if isinstance(info.context, dict) else None
    file = getattr(located, "file", "")
    if value is None or value.is_absolute() or not file or file.startswith("<"):
        return value
    return Path(file).resolve().parent / value


class ListenerTls(Strict):
    """TLS on a listener (``mllp.tls``, ``http.tls``): TLS 1.2 or newer only.

    The certificate and key files are read again when their modification time
    changes (checked every ``reload_s``) or on SIGHUP; new connections get the
    new certificate, open ones keep theirs, and the listener stays up.
    """

    cert_file: Path  # PEM: the server certificate, then any intermediates
    key_file: Path  # PEM private key (keep it 0600)
    # mTLS: when set, a client must present a certificate that chains to this CA (PEM).
    client_ca_file: Path | None = None
    reload_s: float = Field(30.0, gt=0)

    _resolve = field_validator("cert_file", "key_file", "client_ca_file")(_relative_to_config)


class MllpTls(ListenerTls):
    # After the handshake, the client certificate's subject CN or one of its DNS/URI
    # subjectAltNames must be one of these; empty: any certificate the CA signed.
    client_subjects: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def subjects_need_a_ca(self) -> Self:
        if self.client_subjects and self.client_ca_file is None:
            raise ValueError("client_subjects needs client_ca_file (mTLS)")
        return self


class ClientTls(Strict):
    """TLS for a connection ehrbridge makes. Server certificates are always verified."""

    ca_file: Path | None = None  # PEM bundle to verify the server with; default: system CAs
    cert_file: Path | None = None  # client certificate, when the peer asks for one (mTLS)
    key_file: Path | None = None

    _resolve = field_validator("ca_file", "cert_file", "key_file")(_relative_to_config)

    @model_validator(mode="after")
    def cert_and_key_together(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both 'cert_file' and 'key_file', or neither")
        return self


# Asymmetric JWS algorithms only: "none" and HMAC (HS*) are never taken, so a public
# key can never be used as an HMAC secret (RFC 8725 section 2.1, 3.1).
SignatureAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
_ASYMMETRIC: tuple[SignatureAlgorithm, ...] = ("RS256", "RS384", "ES256", "ES384")


class MllpListen(Strict):
    host: str = "127.0.0.1"
    port: int = Field(2575, ge=0, le=65535)
    max_message_bytes: int = Field(1_048_576, ge=1024)
    # A sender that opens a connection and goes quiet must not hold it forever.
    idle_timeout_s: float = Field(300.0, gt=0)
    # Connections beyond this many are closed as soon as they are accepted (and counted).
    max_connections: int = Field(100, ge=1)
    # A frame must end (0x1C 0x0D) within this long of its first byte: a peer dripping one
    # byte a minute never goes idle, so idle_timeout_s alone would hold it forever.
    frame_timeout_s: float = Field(60.0, gt=0)
    # A peer that does not read its ACKs is dropped once an ACK has waited this long to be
    # written; at most write_buffer_bytes of ACKs wait in memory per connection meanwhile.
    write_timeout_s: float = Field(30.0, gt=0)
    write_buffer_bytes: int = Field(65_536, ge=4096)
    tls: MllpTls | None = None  # None: plaintext MLLP
    # How messages without a (known) MSH-18 are read, and their ACKs written: an
    # HL7 table 0211 label ("8859/1") or a codec name. UTF-8 falls back to latin-1.
    charset: str = "UTF-8"

    @field_validator("charset")
    @classmethod
    def charset_is_known(cls, value: str) -> str:
        codec = codec_for_charset(value)
        if codec is None or "MSH|".encode(codec) != b"MSH|":
            raise ValueError(f"{value!r} is not a known charset that reads ASCII as ASCII")
        return value


class HttpListen(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # FHIR ingest: larger request bodies are answered 413 (a Synthea patient is 0.3-2 MB).
    max_body_bytes: int = Field(16_777_216, ge=1024)
    tls: ListenerTls | None = None  # None: plain HTTP


class EmbeddedTransport(Strict):
    kind: Literal["embedded"] = "embedded"
    # How `ehrbridge run` (no --role) runs the roles: all in "one" process, or "per-role":
    # ingest, processing and write-back each a child process of a supervisor, sharing the
    # SQLite files (ehrbridge/supervisor.py), so that they use more than one core.
    processes: Literal["one", "per-role"] = "one"


class KafkaSasl(Strict):
    """SASL authentication to the brokers; the password never goes in the YAML."""

    mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    username: str = Field(..., min_length=1)
    password_env: str | None = None  # name of the environment variable holding it
    password_file: Path | None = None  # or a file holding it (relative to this YAML)

    _resolve = field_validator("password_file")(_relative_to_config)

    @model_validator(mode="after")
    def one_source(self) -> Self:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError("give exactly one of 'password_env' or 'password_file'")
        return self


class KafkaTransport(Strict):
    kind: Literal["kafka"]
    # host:port[,host:port]; when left out, the KAFKA_BOOTSTRAP environment variable.
    bootstrap: str = Field(default_factory=lambda: os.environ.get("KAFKA_BOOTSTRAP", ""))
    # Partitions of the work topics (raw, predictions, retry tiers, state changelog):
    # the most processing workers that can share the load. dlq topics have one.
    partitions: int = Field(6, ge=1)
    replication_factor: int = Field(1, ge=1)
    # How long an append may wait for the broker before the sender gets no AA.
    request_timeout_s: float = Field(5.0, gt=0)
    # Local per-patient state of the processing role, restored from the changelog
    # topic; default <data_dir>/state-kafka.
    state_dir: Path | None = None
    # Client TLS and SASL; both set: SASL_SSL, tls only: SSL, sasl only: SASL_PLAINTEXT.
    tls: ClientTls | None = None
    sasl: KafkaSasl | None = None

    @model_validator(mode="after")
    def bootstrap_is_set(self) -> Self:
        if not self.bootstrap.strip():
            raise ValueError("bootstrap is required for kind: kafka (or set KAFKA_BOOTSTRAP)")
        return self


Transport = Annotated[EmbeddedTransport | KafkaTransport, Field(discriminator="kind")]


# The model a site without a model file runs (its file ships as models/kfre-4.yaml).
DEFAULT_MODEL = "kfre-4var"


class ModelEndpoint(Strict):
    """The site's model: an OIP v2 endpoint taking the KFRE inputs, or a model file.

    With ``file`` (a ``models/<name>.yaml``, relative to the site file) or an
    inline ``definition``, the model's identity, inputs, domain, protocol and
    outputs come from it; ``url`` and ``name`` default to its endpoint's and
    its own, and ``url`` here points the same file at this site's server.
    """

    url: str = Field(..., min_length=1)  # base URL of the model server
    name: str = DEFAULT_MODEL
    file: Path | None = None  # a model file (mappings/model_file.py)
    definition: ModelFile | None = None  # the model file's content, inline (or loaded)
    # No default: required when the mapping's model has several published calibrations
    # (KFRE), checked by load_site_config / parse_site_config (_check_calibration).
    calibration: Calibration | None = None
    timeout_s: float = Field(2.0, gt=0)
    batch_size: int = Field(64, ge=1)
    tls: ClientTls | None = None  # a custom CA bundle or client certificate for https URLs

    @model_validator(mode="before")
    @classmethod
    def from_model_file(cls, data: Any, info: ValidationInfo) -> Any:
        """Load ``file`` (relative to the site file); take url and name from the model."""
        if not isinstance(data, dict) or (data.get("file") is None and not data.get("definition")):
            return data
        data = dict(data)
        if data.get("file") is not None:
            given = data.get("definition")
            data["file"] = _relative_to_config(Path(str(data["file"])), info)
            data["definition"] = load_model_file(data["file"])
            # A dumped configuration carries both, the file's content as loaded: one model.
            if given is not None and not _same_model(given, data["definition"]):
                raise ValueError("give 'file' or 'definition', not both")
        declared = _declared(data["definition"])
        for key, value in declared.items():
            if value is not None:
                data.setdefault(key, value)
        if data.get("name") != declared["name"]:
            raise ValueError(
                f"name {data.get('name')!r}: the model file names it {declared['name']!r}"
            )
        return data

    @property
    def declared(self) -> ModelFile:
        """The model file: the site's, else the shipped one of this name (``models/``)."""
        found = self.definition or builtin_model(self.name) or builtin_model(DEFAULT_MODEL)
        if found is None:
            raise ConfigError(f"no model file declares {self.name!r}", field="model.file")
        return found


def _same_model(given: object, loaded: ModelFile) -> bool:
    """Whether an inline definition is the file's own content (as a dump writes it)."""
    try:
        return ModelFile.model_validate(given) == loaded
    except ValidationError:
        return False


def _declared(definition: object) -> dict[str, Any]:
    """The name and URL a model file (loaded, or inline and not yet validated) declares."""
    if isinstance(definition, ModelFile):
        return {"name": definition.model.name, "url": definition.endpoint.url}
    if not isinstance(definition, dict):
        return {"name": None, "url": None}
    model, endpoint = definition.get("model"), definition.get("endpoint")
    return {
        "name": model.get("name") if isinstance(model, dict) else None,
        "url": endpoint.get("url") if isinstance(endpoint, dict) else None,
    }


class InterpretationBand(Strict):
    """A site's own band, replacing the model file's ``rendering.interpretation``."""

    # An output's name, or its short rendering key (``2y``); ``horizon`` is the older name.
    output: str = Field(..., min_length=1, validation_alias=AliasChoices("output", "horizon"))
    at_least: float = Field(..., ge=0, le=1)  # risk as a fraction
    code: str  # v3-ObservationInterpretation code, e.g. H
    display: str


class ResultCoding(Strict):
    """Observation.code, replacing the model file's ``rendering.code``."""

    system: str = "urn:ehrbridge:codes"
    code: str = Field(..., min_length=1)
    display: str = Field(..., min_length=1)


class BearerAuth(Strict):
    """A static bearer token, read from an environment variable or a file (never the YAML)."""

    kind: Literal["bearer"]
    token_env: str | None = None  # name of the environment variable holding the token
    token_file: Path | None = None  # or a file holding it (relative to this YAML)

    _resolve = field_validator("token_file")(_relative_to_config)

    @model_validator(mode="after")
    def one_source(self) -> Self:
        if (self.token_env is None) == (self.token_file is None):
            raise ValueError("give exactly one of 'token_env' or 'token_file'")
        return self


class SmartBackendAuth(Strict):
    """SMART Backend Services: client credentials with a signed JWT assertion.

    The private key (PEM) comes from ``private_key_file`` or the environment
    variable named by ``private_key_env``; the YAML holds only names and paths.
    """

    kind: Literal["smart-backend-services"]
    client_id: str = Field(..., min_length=1)
    # Default: discovered from <fhir_base>/.well-known/smart-configuration.
    token_url: str | None = None
    scope: str = (
        "system/Observation.write system/Provenance.write system/Device.write"
        " system/Observation.read system/Patient.read"
    )
    algorithm: Literal["RS384", "ES384"] = "RS384"
    key_id: str = Field(..., min_length=1)  # JWT header kid: the key in the client's JWKS
    jwks_url: str | None = None  # JWT header jku, when the EHR registered a JWKS URL
    private_key_file: Path | None = None
    private_key_env: str | None = None

    _resolve = field_validator("private_key_file")(_relative_to_config)

    @model_validator(mode="after")
    def one_key_source(self) -> Self:
        if (self.private_key_env is None) == (self.private_key_file is None):
            raise ValueError("give exactly one of 'private_key_file' or 'private_key_env'")
        return self


FhirAuth = Annotated[BearerAuth | SmartBackendAuth, Field(discriminator="kind")]


class Hl7Code(Strict):
    """A coded element (CWE) as the receiving EHR knows it: OBR-4, OBX-3."""

    code: str = Field(..., min_length=1)
    text: str = ""
    system: str = "99EHB"  # HL7 table 0396: 99zzz is a local coding system


class PlaceholderName(Strict):
    """PID-5 when no name was received: PID-5 is required (R) in ORU^R01 from v2.5."""

    family: str = Field("UNKNOWN", min_length=1, max_length=100)  # XPN.1
    # XPN.7, HL7 table 0200: S "coded pseudo-name to ensure anonymity", U unspecified.
    name_type: Literal["S", "U"] = "S"


class Hl7v2Writeback(Strict):
    """Results as ORU^R01 over MLLP, for EHRs without FHIR write access."""

    host: str = Field(..., min_length=1)
    port: int = Field(..., ge=1, le=65535)
    # MSH-12. The versions whose ORU_R01 structure our messages conform to, checked
    # strictly with hl7apy (2.3.x lacks OBX-19 and MSH-9.3; 2.8 requires ORC).
    version: Literal["2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1"] = "2.5.1"
    processing_id: str = "P"  # MSH-11: P production, T training, D debugging
    sending_application: str = "EHRBRIDGE"  # MSH-3
    sending_facility: str | None = None  # MSH-4, default: the site name
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    ack_timeout_s: float = Field(10.0, gt=0)  # also the connect timeout
    # After an ACK timeout the same message (same MSH-10) is sent again this many times.
    resends: int = Field(2, ge=0)
    tls: ClientTls | None = None  # None: plaintext MLLP; set: MLLP over TLS to host:port
    on_error: Literal["retry", "dead-letter"] = "dead-letter"  # MSA-1 AE
    on_reject: Literal["retry", "dead-letter"] = "retry"  # MSA-1 AR
    # OBR-4 and each output's OBX-3 (by output name or rendering key); default: the
    # model file's rendering (``order``, ``components[].hl7``).
    order: Hl7Code | None = None
    results: dict[str, Hl7Code] = Field(default_factory=dict)
    unknown_name: PlaceholderName = PlaceholderName()  # PID-5 when no name was received


class Writeback(Strict):
    fhir_base: str | None = None  # the EHR's FHIR server base URL (FHIR write-back)
    timeout_s: float = Field(5.0, gt=0)
    auth: FhirAuth | None = None  # how to authenticate to fhir_base
    tls: ClientTls | None = None  # CA bundle / client certificate for fhir_base and its tokens
    provenance: bool = True  # a Provenance (and the Devices it names) with every Observation
    # Observation.subject: "reference" resolves Patient?identifier= on the server (the
    # Patient must exist), "reference-or-create" also creates it when missing, "identifier"
    # writes a logical reference only (servers without the :identifier modifier, e.g.
    # HAPI, cannot search those).
    subject: Literal["reference", "reference-or-create", "identifier"] = "reference"
    results_per_request: int = Field(20, ge=1)  # results per FHIR transaction
    hl7v2: Hl7v2Writeback | None = None  # ORU^R01 write-back over MLLP
    code: ResultCoding | None = None  # default: the model file's rendering.code
    identifier_system: str | None = None  # default: urn:ehrbridge:<site>:prediction
    # Default: the model file's rendering.interpretation.
    interpretation: list[InterpretationBand] | None = None


class KnownSubscription(Strict):
    """A Subscription this site made at the EHR: only these may notify it."""

    # As the notification's status names it: "Subscription/<id>" (matched against the
    # reference's last two segments) or an absolute URL (matched exactly).
    reference: str = Field(..., min_length=1)
    # This Subscription's own header token (what its channel.header carries), from
    # the environment or a file; accepted for this Subscription's notifications only.
    token_env: str | None = None
    token_file: Path | None = None

    _resolve = field_validator("token_file")(_relative_to_config)

    @model_validator(mode="after")
    def at_most_one_source(self) -> Self:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("give one of 'token_env' or 'token_file', not both")
        return self


class Subscriptions(Strict):
    """FHIR Subscriptions (R4 Backport IG / R5 topic-based) whose notifications we receive."""

    # The Subscriptions that may notify; a notification naming another is refused
    # (403) before anything is read from the EHR.
    known: list[KnownSubscription] = Field(default_factory=list)

    # Where id-only notifications' resources are read; default: writeback.fhir_base.
    fhir_base: str | None = None
    auth: FhirAuth | None = None  # default: writeback.auth
    tls: ClientTls | None = None  # default: writeback.tls
    timeout_s: float = Field(5.0, gt=0)
    # The environment variable holding a bearer token the EHR may send with every
    # known Subscription's notifications (what Subscription.channel.header carries).
    # Notifications are also taken with an API token of role sender (auth.tokens).
    token_env: str | None = None
    # Missed notifications are asked for again from fhir_base (Backport IG $events);
    # open gaps are tried again by a sweep of this period (and at start).
    backfill: bool = True
    backfill_retry_s: float = Field(300.0, gt=0)


class CdsClient(Strict):
    """An EHR allowed to call the CDS service: its JWT ``iss`` and where its keys are.

    https://cds-hooks.hl7.org/2.0/#trusting-cds-clients: the EHR signs a JWT per
    request; the service trusts it by ``iss`` and that issuer's JWK Set.
    """

    issuer: str = Field(..., min_length=1)  # the JWT's iss, exactly
    jwks_url: str | None = None  # the issuer's JWK Set over HTTPS
    jwks_file: Path | None = None  # or a JWK Set file (relative to this YAML)
    # JWT header jku values this issuer may name; jwks_url is always allowed.
    jku: list[str] = Field(default_factory=list)
    algorithms: list[SignatureAlgorithm] = Field(default_factory=lambda: list(_ASYMMETRIC))

    _resolve = field_validator("jwks_file")(_relative_to_config)

    @model_validator(mode="after")
    def has_keys(self) -> Self:
        if self.jwks_url is not None and self.jwks_file is not None:
            raise ValueError("give one of 'jwks_url' or 'jwks_file', not both")
        if self.jwks_url is None and self.jwks_file is None and not self.jku:
            raise ValueError("give 'jwks_url', 'jwks_file' or allowed 'jku' URLs")
        return self


class CdsHooks(Strict):
    """The CDS Hooks service (patient-view) serving the precomputed latest risk."""

    enabled: bool = True
    # The service's base URL as the EHR calls it (before /cds-services): the JWT's aud
    # must be <service_base_url>/cds-services/<service id>. Default: the request's own.
    service_base_url: str | None = None
    # The EHRs allowed to call (JWT iss allowlist); none: every hook call is refused.
    clients: list[CdsClient] = Field(default_factory=list)
    # Longest JWT lifetime taken (exp - now); the specification asks for 5 minutes.
    max_token_lifetime_s: float = Field(600.0, gt=0)
    leeway_s: float = Field(30.0, ge=0)  # clock skew allowed on exp / nbf / iat
    # jti values remembered against replay until their token expires; when full of
    # unexpired tokens, new calls are refused (503) rather than forgetting one.
    replay_cache_size: int = Field(100_000, ge=100)
    # Card link: a URL template with {identifier} and {patient}; default: this API's
    # patient risk page, /ui/patients/{patient}?result={identifier}.
    details_url: str | None = None
    # In shadow mode clinicians see nothing unless this is true (e.g. a pilot ward).
    cards_in_shadow_mode: bool = False
    # Hook and feedback request bodies above this are answered 413, unread. A
    # patient-view request with its Patient prefetch is a few KB.
    max_body_bytes: int = Field(1_048_576, ge=1024)


class SmartLaunch(Strict):
    """The patient risk page as a SMART on FHIR app the EHR launches (EHR launch).

    https://hl7.org/fhir/smart-app-launch/app-launch.html: the EHR opens
    ``/ui/launch?iss=<its FHIR base>&launch=<context>``; ehrbridge sends the
    browser to the EHR's authorization endpoint (authorization code with PKCE,
    as a public client) and, back at ``/ui/launch/callback``, exchanges the
    code for the launch's patient and shows that patient's risk page.
    """

    client_id: str = Field(..., min_length=1)  # as registered with the EHR
    # The FHIR base URLs (iss) allowed to launch it, exactly; any other is refused, so
    # no request makes ehrbridge call or send a browser to an arbitrary server.
    issuers: list[str] = Field(..., min_length=1)
    scope: str = "launch openid fhirUser patient/Patient.read"
    # This app's callback as registered with the EHR; default: the request's own
    # <base>/ui/launch/callback.
    redirect_uri: str | None = None
    timeout_s: float = Field(5.0, gt=0)  # each call to the EHR's endpoints


class ApiRole(StrEnum):
    """What a caller of the HTTP API may do (``ehrbridge/auth.py``)."""

    VIEWER = "viewer"  # results, patients, monitoring
    OPERATOR = "operator"  # plus dead letters (raw bytes, replay) and message search
    ADMIN = "admin"  # plus the audit trail; may do what every other role may
    SENDER = "sender"  # an EHR or interface engine: FHIR ingest and notifications only


class StaticToken(Strict):
    """A named API token with one role, read from the environment or a file."""

    name: str = Field(..., min_length=1)  # who, in the audit trail
    role: ApiRole
    token_env: str | None = None
    token_file: Path | None = None  # relative to this YAML

    _resolve = field_validator("token_file")(_relative_to_config)

    @model_validator(mode="after")
    def one_source(self) -> Self:
        if (self.token_env is None) == (self.token_file is None):
            raise ValueError("give exactly one of 'token_env' or 'token_file'")
        return self


class JwtIssuer(Strict):
    """An OpenID Connect / SMART authorization server whose access tokens the API takes."""

    issuer: str = Field(..., min_length=1)  # the tokens' iss, exactly
    audience: str = Field(..., min_length=1)  # the tokens' aud must contain this
    jwks_url: str | None = None  # the issuer's JWK Set (jwks_uri)
    jwks_file: Path | None = None  # or a JWK Set file (relative to this YAML)
    algorithms: list[SignatureAlgorithm] = Field(default_factory=lambda: list(_ASYMMETRIC))
    # The claim with the caller's roles: a list, or a space-separated string (scope).
    roles_claim: str = "roles"
    # Claim values that grant a role; default: the role names themselves.
    role_values: dict[str, ApiRole] = Field(default_factory=dict)
    subject_claim: str = "sub"  # who, in the audit trail
    leeway_s: float = Field(30.0, ge=0)
    jwks_cache_s: float = Field(300.0, gt=0)  # how long a fetched JWK Set is used

    _resolve = field_validator("jwks_file")(_relative_to_config)

    @model_validator(mode="after")
    def one_key_source(self) -> Self:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of 'jwks_url' or 'jwks_file'")
        return self


class ApiAuth(Strict):
    """Who may call the HTTP API. With nothing configured, only the public routes answer."""

    tokens: list[StaticToken] = Field(default_factory=list)
    jwt: list[JwtIssuer] = Field(default_factory=list)

    @field_validator("tokens")
    @classmethod
    def names_are_unique(cls, tokens: list[StaticToken]) -> list[StaticToken]:
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise ValueError("token names must be unique (they name the caller in the audit)")
        return tokens


class RetryPolicy(Strict):
    attempts: int = Field(5, ge=1)  # in-place attempts before the delayed retry queue
    initial_backoff_s: float = Field(0.2, gt=0)
    max_backoff_s: float = Field(5.0, gt=0)
    # Delays of the delayed-retry queue; after the last one the record is dead-lettered.
    delayed_s: list[float] = Field(default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 3600.0])


class Retention(Strict):
    """How long PHI is kept, per store, in days (None: kept until deleted by hand).

    A purge never removes what is not done: a log record before its consumer
    group's committed offset, a live result not yet delivered to the EHR. On
    Kafka the topics' ``retention.ms`` (set from these values when ehrbridge
    creates them) does the log's part, by age alone.
    """

    raw_days: float | None = Field(None, gt=0)  # raw, predictions and retry-tier records
    dead_letter_days: float | None = Field(None, gt=0)  # dlq and dlq.replayed records
    results_days: float | None = Field(None, gt=0)  # the local result store
    inbox_days: float | None = Field(None, gt=0)  # sandbox: ehr-inbox.hl7 entries
    # The audit trail, in whole months once all of a month is older. HIPAA keeps its
    # required documentation 6 years (45 CFR 164.316(b)(2)): about 2200 days.
    audit_days: float | None = Field(None, gt=0)
    purge_interval_s: float = Field(3600.0, gt=0)  # how often a running site purges


class FeedExpectation(Strict):
    # Messages per hour this source sends, every hour; leave out to learn it per hour of
    # the week (pipelines/feeds.py).
    expected_per_hour: float | None = Field(None, ge=0)


class DriftSettings(Strict):
    # The first this many days a site runs (its shadow period) are the reference window.
    reference_days: int = Field(14, ge=1)
    # Or a reference exported from a validation set (GET /api/monitoring/drift's reference).
    reference_file: Path | None = None
    # A day's feature is compared only once it has this many values (and so has the reference).
    min_count: int = Field(100, ge=1)


class Monitoring(Strict):
    """Metrics, readiness, feed silence and drift (README "Monitoring")."""

    # Where a process without the ingest role (which serves the HTTP API on http.port)
    # serves /metrics and /health/*: None = not at all; 0 = a free port (logged).
    port: int | None = Field(None, ge=0, le=65535)
    ready_cache_s: float = Field(5.0, ge=0)  # /health/ready re-checks at most this often
    save_interval_s: float = Field(60.0, gt=0)  # feed clocks and drift counts to the data dir
    feeds: dict[Literal["mllp", "fhir"], FeedExpectation] = Field(default_factory=dict)
    drift: DriftSettings = DriftSettings()


class PromotionCriteria(Strict):
    """Evidence a model needs before it goes live here; each left out is not judged."""

    min_days: int | None = Field(None, ge=1)  # days between the first and last prediction
    min_scored_patients: int | None = Field(None, ge=1)
    max_missing_input_rate: float | None = Field(None, ge=0, le=1)  # of patients seen
    max_flags_per_day: float | None = Field(None, ge=0)  # at every band
    min_auroc_lower_ci: float | None = Field(None, ge=0, le=1)  # each horizon
    calibration_slope: tuple[float, float] | None = None  # [low, high], each horizon
    max_abs_calibration_in_the_large: float | None = Field(None, ge=0)
    # At promotion, the shadow period's results: "none" are written to the EHR (default:
    # they were never reviewed as live results and may be stale), or each patient's
    # "latest", if still the latest, inside the model's domain and not future-dated.
    shadow_results: Literal["none", "latest"] = "none"
    # Alert names (Prometheus alertname) that demote the model when Alertmanager's webhook
    # reports them firing (POST /api/models/{model}/alerts); empty: alerts never demote.
    demote_on_alerts: list[str] = Field(default_factory=list)


class ModelEvaluation(Strict):
    """One model's own evaluation settings under ``evaluation.models.<name>``.

    Each field given replaces the site's (``evaluation.<field>``) for that model
    only; a field left out is the site's. Promotion criteria are replaced whole,
    not merged: a model's bar is read in one place.
    """

    outcome: Path | None = None  # the model's outcome YAML (default: the one shipped for it)
    code_map: Path | None = None
    promotion: PromotionCriteria | None = None

    _resolve = field_validator("outcome", "code_map")(_relative_to_config)


class EvaluationSettings(Strict):
    """``ehrbridge evaluate``: the outcome, local codes and audit groups (README "Evaluate")."""

    outcome: Path | None = None  # outcome YAML; default: the one shipped for the model
    code_map: Path | None = None  # CSV system,code,display: the site's own outcome codes
    events: Path | None = None  # FHIR Bulk Data export (NDJSON) with outcomes; --events overrides
    attributes: Path | None = None  # CSV patient_id,<attribute>,...: site-declared audit groups
    subgroups: list[str] = Field(default_factory=lambda: ["sex", "age_band"])
    reference_groups: dict[str, str] = Field(default_factory=dict)  # attribute -> group
    # One prediction per patient (the first) by default: a patient's several predictions
    # are not independent, and counting each would narrow every interval.
    unit: Literal["patient-first", "patient-last", "prediction"] = "patient-first"
    promotion: PromotionCriteria | None = None  # judged by evaluate: pass/fail/inconclusive
    # A site running several models (``models:``): what differs for one of them, by name.
    models: dict[str, ModelEvaluation] = Field(default_factory=dict)

    _resolve = field_validator("outcome", "code_map", "events", "attributes")(_relative_to_config)

    def of_model(self, name: str) -> EvaluationSettings:
        """The settings the model ``name`` is evaluated and promoted with: each field its
        ``models.<name>`` entry gives, else the site's own."""
        own = self.models.get(name)
        if own is None:
            return self
        return self.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})


class StorageEncryption(Strict):
    """Encrypt the site's SQLite stores with SQLCipher (the ``encryption`` extra).

    The key comes from the environment or a file, never the YAML. Turn it on
    before a site first runs: files written unencrypted are refused, not converted.
    """

    key_env: str | None = None  # name of the environment variable holding the key
    key_file: Path | None = None  # or a file holding it (relative to this YAML; keep it 0600)

    _resolve = field_validator("key_file")(_relative_to_config)

    @model_validator(mode="after")
    def one_source(self) -> Self:
        if (self.key_env is None) == (self.key_file is None):
            raise ValueError("give exactly one of 'key_env' or 'key_file'")
        return self


class SiteConfig(Strict):
    site: str
    mode: Mode = Mode.SHADOW
    data_dir: Path = Path("data")
    mllp: MllpListen = MllpListen()
    http: HttpListen = HttpListen()
    transport: Transport = EmbeddedTransport()
    mapping: Mapping
    model: ModelEndpoint  # the site's model; with `models:`, the first of them
    # Several models on the same traffic, each with its own mode, Observations and results.
    models: list[ModelEndpoint] = Field(default_factory=list)
    writeback: Writeback = Writeback()
    subscriptions: Subscriptions = Subscriptions()
    cds_hooks: CdsHooks = CdsHooks()
    smart_launch: SmartLaunch | None = None  # the risk page as a SMART EHR-launch app
    auth: ApiAuth = ApiAuth()
    retry: RetryPolicy = RetryPolicy()
    retention: Retention = Retention()
    encryption: StorageEncryption | None = None  # SQLCipher for the SQLite stores
    monitoring: Monitoring = Monitoring()
    evaluation: EvaluationSettings = EvaluationSettings()
    strict_hl7: bool = False  # validate message structure with hl7apy (slow; for debugging)
    # HL7v2 message types (MSH-9) beyond ORU^R01 and ADT^*, which are accepted unless
    # listed here: accept, filter or reject. Unlisted types are rejected (HL7 original
    # mode: AR, code 200 unsupported message type, 201 unsupported event).
    message_types: dict[str, MessagePolicy] = Field(default_factory=dict)

    _message_types = field_validator("message_types")(check_message_types)

    @model_validator(mode="before")
    @classmethod
    def first_of_models(cls, data: Any) -> Any:
        """``models: [a, b]`` runs both; ``model`` is then ``a`` (give one or the other)."""
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(models, list) or not models:
            return data
        # A dumped configuration carries both, the first model twice: that is one model.
        if "model" in data and data["model"] != models[0]:
            raise ValueError("give 'model' (one model) or 'models' (several), not both")
        return {**data, "model": models[0]}

    @model_validator(mode="after")
    def distinct_models(self) -> Self:
        names = [m.name for m in self.site_models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: each model once by name ({', '.join(names)})")
        return self

    @model_validator(mode="after")
    def evaluated_models_are_run(self) -> Self:
        names = [m.name for m in self.site_models]
        if unknown := sorted(set(self.evaluation.models) - set(names)):
            raise ValueError(
                f"evaluation.models: {', '.join(unknown)} not among the site's models "
                f"({', '.join(names)})"
            )
        return self

    def for_model(self, name: str) -> SiteConfig | None:
        """The site as its model ``name`` sees it: that model as ``model``, its own
        evaluation settings as ``evaluation``; None if the site runs no such model.

        Everything that evaluates, judges, records or switches one model reads
        ``config.model`` and ``config.evaluation``, so each of the site's models has
        its own outcome, criteria, evaluation and mode file.
        """
        found = next((m for m in self.site_models if m.name == name), None)
        if found is None:
            return None
        evaluation = self.evaluation.of_model(name)
        if found is self.model and evaluation is self.evaluation:
            return self
        return self.model_copy(update={"model": found, "evaluation": evaluation})

    @model_validator(mode="after")
    def one_definition_per_aggregate(self) -> Self:
        """An aggregate is computed once per record: two definitions of one name cannot both be."""
        seen: dict[str, tuple[str, object]] = {}
        for model in self.site_models:
            for given in model.declared.inputs:
                if given.aggregate is None:
                    continue
                if given.aggregate.of not in self.mapping.features:
                    raise ValueError(
                        f"model {model.name}'s input {given.name!r} is over "
                        f"{given.aggregate.of}, which the mapping does not map"
                    )
                first = seen.setdefault(given.name, (model.name, given.aggregate))
                if first[1] != given.aggregate:
                    raise ValueError(
                        f"aggregate {given.name!r}: model {model.name} defines it unlike "
                        f"model {first[0]}; give one of them another name"
                    )
        return self

    @property
    def site_models(self) -> list[ModelEndpoint]:
        """Every model the site runs, the first being ``model`` (which wins over ``models[0]``)."""
        return [self.model, *self.models[1:]]

    def model_named(self, name: str) -> ModelEndpoint:
        """The site's model of that name (a result names its model); else the first."""
        return next((m for m in self.site_models if m.name == name), self.model)

    @field_validator("site")
    @classmethod
    def site_name_is_a_token(cls, value: str) -> str:
        if not _SITE_NAME.match(value):
            raise ValueError("use lower-case letters, digits, '-', '_' or '.' (it prefixes topics)")
        return value

    @model_validator(mode="after")
    def live_needs_a_target(self) -> Self:
        wb = self.writeback
        if self.mode is Mode.LIVE and not wb.fhir_base and wb.hl7v2 is None:
            raise ValueError(
                "mode is 'live' but writeback.fhir_base is not set (nor writeback.hl7v2)"
            )
        return self

    @property
    def prediction_identifier_system(self) -> str:
        return self.writeback.identifier_system or f"urn:ehrbridge:{self.site}:prediction"


def _check_calibration(config: SiteConfig, located: LocatedYaml) -> SiteConfig:
    """A model with several published calibrations runs only with the site's stated one.

    KFRE's North American and non-North-American baselines differ by up to 3.5
    percentage points; a European site left on a default would be wrong for most
    panels with nothing to warn anyone. So there is no default to be left on.
    Checked for each of the site's models.
    """
    for index, model in enumerate(config.site_models):
        path: tuple[str | int, ...] = ("models", index) if config.models else ("model",)
        _check_one_calibration(config, model, index, (located, path))
    return config


def _check_one_calibration(
    config: SiteConfig,
    model: ModelEndpoint,
    index: int,
    where: tuple[LocatedYaml, tuple[str | int, ...]],
) -> None:
    located, path = where
    definition = model.definition
    if definition is None and index > 0:
        definition = model.declared
    if definition is not None:
        name = definition.model.name
        calibrations = tuple(definition.calibrations.choices) if definition.calibrations else ()
    else:
        name, calibrations = config.mapping.spec.name, config.mapping.spec.calibrations
    stated = model.calibration
    choices = " or ".join(calibrations)
    field = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in path)
    field = field.replace(".[", "[") + ".calibration"
    line = located.line_of((*path, "calibration"))
    if stated is not None and calibrations and stated not in calibrations:
        raise ConfigError(
            f"{stated} is not a calibration of {name} ({choices})",
            file=located.file,
            line=line,
            field=field,
        )
    if not calibrations or stated is not None:
        return
    raise ConfigError(
        f"required for {name}: state the calibration for this site's patients "
        f"({choices}; non_north_american outside the US and Canada). There is no default: "
        "the wrong one shifts risks by up to 3.5 percentage points",
        file=located.file,
        line=line,
        field=field,
    )


def describe_model(config: SiteConfig, model: ModelEndpoint | None = None) -> str:
    """Which model, from where, over which protocol, with which calibration and domain."""
    model = model or config.model
    if model.name != config.model.name:  # a further model scores in its own file's domain
        rules = ", ".join(model.declared.domain) or "none"
        return f"{model.name} {model.declared.model.version}{_from(model)}; domain: {rules}"
    definition = model.definition
    protocol = definition.endpoint.protocol if definition else "oip-v2"
    named = f"{model.name} {definition.model.version}" if definition else model.name
    source = f" from {model.file}" if model.file else ""
    calibration = f", calibration {model.calibration}" if model.calibration else ""
    domain = ", ".join(str(rule) for rule in config.mapping.domain) or "none"
    return f"{named}{source} over {protocol} at {model.url}{calibration}; domain: {domain}"


def _from(model: ModelEndpoint) -> str:
    protocol = model.declared.endpoint.protocol
    source = f" from {model.file}" if model.file else ""
    calibration = f", calibration {model.calibration}" if model.calibration else ""
    return f"{source} over {protocol} at {model.url}{calibration}"


def _with_model_domain(config: SiteConfig) -> SiteConfig:
    """A model file's domain (applicability and input ranges) unless the mapping sets one."""
    definition = config.model.definition
    if definition is None or config.mapping.applicability is not None:
        return config
    mapping = config.mapping.model_copy(update={"applicability": list(definition.domain)})
    return config.model_copy(update={"mapping": mapping})


def _checked(config: SiteConfig, located: LocatedYaml) -> SiteConfig:
    return _with_model_domain(_check_calibration(config, located))


def load_site_config(path: Path | str, **overrides: object) -> SiteConfig:
    """Load and validate a site YAML file. Raises ConfigError naming file:line:field."""
    located = load_located(path)
    if overrides and isinstance(located.data, dict):
        located.data = {**located.data, **overrides}
    config = _checked(validate_located(SiteConfig, located), located)
    if not config.data_dir.is_absolute():
        base = Path(path).resolve().parent
        env_dir = os.environ.get("EHRBRIDGE_DATA_DIR")
        data_dir = Path(env_dir) if env_dir else base / config.data_dir
        config = config.model_copy(update={"data_dir": data_dir})
    return config


def parse_site_config(text: str, file: str = "<string>") -> SiteConfig:
    """Validate YAML text (tests, and configs that arrive over an API)."""
    located = parse_located(text, file)
    return _checked(validate_located(SiteConfig, located), located)
