"""A synthetic EHR: HL7v2 ADT and renal ORU^R01 traffic for fake CKD patients.

None of the public HL7v2 corpora carries renal labs, so the sandbox writes its
own. The message shapes follow real 2.5.1 lab reporting (NIST ELR test cases,
CDC ReportStream): ``MSH SFT PID PV1 {ORC OBR {OBX [NTE]} SPM}``.

Every patient is fictional: names come from obviously fake word lists, the
second identifier sits in the NHS *test* number range (999 xxx xxxx), phone
numbers in the Ofcom drama range. Each patient follows a CKD trajectory:
a true eGFR falling linearly from a baseline, and a log-normal albuminuria
drifting slowly. At each lab visit the serum creatinine that gives the true
eGFR (CKD-EPI 2021, inverted) is "measured" with noise, rounded as a lab
rounds it, and -- when the patient's lab reports eGFR -- the reported eGFR is
CKD-EPI 2021 of that *reported* creatinine at the patient's age on the
specimen date (days / 365.2425, the same age ehrbridge uses).

The renal function panel (LOINC 24362-6) carries what the 8-variable KFRE
needs besides: albumin, phosphate, total CO2 (bicarbonate) and calcium, which
follow the patient's state (phosphate up and bicarbonate down as GFR falls,
albumin down with heavy albuminuria). A lab that reports creatinine in umol/L
reports them in SI units too: albumin g/L, phosphate and calcium mmol/L.

Determinism: the same seed and the same sequence of calls give the same bytes.
Patients come from one seeded generator; measurement noise is seeded from
(seed, patient, specimen time), so it does not depend on call order. MSH-10
control ids come from a per-instance counter, so they are unique within an
instance and identical between two instances with the same seed.

Messages are assembled as plain strings (benchmarks need tens of thousands);
the tests prove the structure with hl7apy.
"""

from __future__ import annotations

import functools
import json
import math
import random
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from ehrbridge.mappings.ckd_epi import CREATININE_UMOL_PER_MG_DL, egfr_ckd_epi_2021

AdtEvent = Literal["A01", "A04", "A08"]
Panel = Literal["renal", "uacr", "both"]
ResultStatus = Literal["P", "F", "C"]  # HL7 table 0085 subset
Sex = Literal["M", "F", "U"]  # HL7 table 0001 subset
CreatinineUnit = Literal["mg/dL", "umol/L"]
UacrUnit = Literal["mg/g", "mg/g{creat}", "mg/mmol"]
EgfrUnit = Literal["mL/min/{1.73_m2}", "mL/min/1.73m2"]
ComparatorStyle = Literal["SN", "NM"]

DAYS_PER_YEAR = 365.2425  # the age convention of ehrbridge.pipelines.features.age_at
UACR_MG_G_PER_MG_MMOL = 8.84  # 1 mmol creatinine = 113.12 mg -> 1 mg/mmol = 8.84 mg/g
VERSION = "2.5.1"
RECEIVING = "EHRBRIDGE^^L|EHRBRIDGE^^L"  # MSH-5 receiving application | MSH-6 facility
EGFR_CODES = {
    "98979-8": "eGFRcr CKD-EPI 2021 [Volume Rate/Area] in Serum, Plasma or Blood",
    "62238-1": "eGFRcr CKD-EPI [Volume Rate/Area] in Serum or Plasma",
    "48642-3": "eGFR/1.73 sq M.predicted among non-blacks [Volume Rate/Area] in Serum",
}
UACR_CODES = {
    "9318-7": "Albumin/Creatinine [Mass Ratio] in Urine",
    "14959-1": "Microalbumin/Creatinine [Mass Ratio] in Urine",
    "32294-1": "Albumin/Creatinine [Ratio] in Urine",
}
CREATININE_CODE = ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma")
EGFR_CAP = 90.0  # labs that print ">90" instead of a high eGFR
UACR_FLOOR_MG_G = 3.0  # below this, labs print "<3" (mg/g) or "<0.3" (mg/mmol)
EGFR_NOTE = (
    "eGFR calculated with the CKD-EPI 2021 equation (no race coefficient) & "
    "normalised to 1.73 m^2 body surface area."
)

_FAMILY = (
    "Testperson", "Sandboxer", "Fakeley", "Mockridge", "Synthson", "Dummer",
    "Placeholt", "Exampleton", "Notreal", "Fictive", "Madeup", "Pretendo",
)  # fmt: skip
_GIVEN = (
    "Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel",
    "India", "Juliet", "Kilo", "Lima", "Mike", "November", "Oscar", "Papa",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class LabProfile:
    """How the patient's laboratory reports: units, codes and habits."""

    creatinine_unit: CreatinineUnit
    uacr_unit: UacrUnit
    egfr_unit: EgfrUnit
    reports_egfr: bool
    egfr_code: str  # a key of EGFR_CODES; the value is CKD-EPI 2021 whatever the code
    uacr_code: str  # a key of UACR_CODES
    caps_egfr_at_90: bool  # prints ">90" for a high eGFR
    comparator_style: ComparatorStyle  # SN ">^90" (conformant) or NM ">90" (common)
    sends_analysis_time: bool  # OBX-19
    mrn_first: bool  # order of the PID-3 repetitions

    @property
    def si(self) -> bool:
        """An SI lab reports glucose, urea and calcium in mmol/L too."""
        return self.creatinine_unit == "umol/L"


@dataclass(frozen=True, slots=True)
class SyntheticPatient:
    """A fictional CKD patient and the trajectory their lab results follow."""

    mrn: str  # PID-3 CX.1 with CX.4 SANDBOX, CX.5 MR
    national_id: str  # PID-3 CX.1 with CX.4 NHS, CX.5 NH (NHS test range 999...)
    family: str
    given: str
    birth_date: date
    sex: Sex
    baseline_egfr: float  # mL/min/1.73 m2 at trajectory_origin
    egfr_decline_per_year: float  # mL/min/1.73 m2 per year
    baseline_uacr_mg_g: float  # at trajectory_origin
    uacr_log_change_per_year: float  # natural-log drift of UACR per year
    trajectory_origin: datetime
    diabetic: bool
    lab: LabProfile

    @property
    def female(self) -> bool:
        return self.sex == "F"

    def age_at(self, at: datetime) -> float:
        return age_years(self.birth_date, at)

    def true_egfr(self, at: datetime) -> float:
        """The noiseless eGFR of the trajectory at a moment (never below 4)."""
        years = (_aware(at) - self.trajectory_origin).total_seconds() / (DAYS_PER_YEAR * 86400)
        return max(4.0, self.baseline_egfr - self.egfr_decline_per_year * years)

    def true_uacr_mg_g(self, at: datetime) -> float:
        years = (_aware(at) - self.trajectory_origin).total_seconds() / (DAYS_PER_YEAR * 86400)
        return self.baseline_uacr_mg_g * math.exp(self.uacr_log_change_per_year * years)


def age_years(birth_date: date, at: datetime) -> float:
    """Age on the date of ``at`` in years of 365.2425 days (as ehrbridge computes it)."""
    return (_aware(at).date() - birth_date).days / DAYS_PER_YEAR


def creatinine_for_egfr(egfr: float, age: float, female: bool) -> float:
    """Serum creatinine (mg/dL) whose CKD-EPI 2021 eGFR is ``egfr``: the equation inverted.

    eGFR = K x min(r,1)^a x max(r,1)^-1.2 with r = Scr/kappa; eGFR >= K means r <= 1.
    """
    kappa, alpha = (0.7, -0.241) if female else (0.9, -0.302)
    k = 142.0 * 0.9938**age * (1.012 if female else 1.0)
    exponent = alpha if egfr >= k else -1.200
    return float(kappa * (egfr / k) ** (1.0 / exponent))


def escape_text(text: str) -> str:
    """Escape HL7 delimiters in free text (\\E\\ first, then \\F\\ \\S\\ \\T\\ \\R\\)."""
    return (
        text.replace("\\", "\\E\\")
        .replace("|", "\\F\\")
        .replace("^", "\\S\\")
        .replace("&", "\\T\\")
        .replace("~", "\\R\\")
    )


@functools.cache
def _escaped(text: str) -> str:
    # Displays repeat endlessly; escaping each once keeps the hot path cheap.
    return escape_text(text)


def hl7_timestamp(at: datetime) -> str:
    """DTM with seconds and an explicit offset (naive times are taken as UTC)."""
    at = _aware(at)
    offset = at.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    hours, minutes_only = divmod(abs(minutes), 60)
    sign = "-" if minutes < 0 else "+"
    # Plain formatting: strftime costs several microseconds and we write ~8 per message.
    return (
        f"{at.year:04d}{at.month:02d}{at.day:02d}{at.hour:02d}{at.minute:02d}{at.second:02d}"
        f"{sign}{hours:02d}{minutes_only:02d}"
    )


def format_number(value: float) -> str:
    """A float as an HL7 NM: plain decimal, no exponent, no trailing zeros."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


@dataclass(frozen=True, slots=True)
class _Result:
    """One OBX worth of content."""

    code: str
    text: str
    value: str
    unit: str
    ref: str = ""
    flag: str = ""
    value_type: str = "NM"
    status: str = "F"
    unit_system: str = "UCUM"
    note: str = ""  # NTE after the OBX


@dataclass(frozen=True, slots=True)
class _Order:
    """One ORC/OBR group: what was ordered and its results."""

    service: str  # OBR-4
    specimen: str  # SPM-4
    results: tuple[_Result, ...]
    status: str  # OBR-25


@dataclass(frozen=True, slots=True)
class _Header:
    """Message-level values, timestamps already formatted as DTM."""

    control_id: str
    order_key: str  # seeds placer/filler numbers; the same for P, F and C of one order
    sent: str  # MSH-7, ORC-9, OBR-22
    collected: str  # OBR-7, OBX-14, SPM-17
    received: str  # OBR-14, SPM-18
    analysed: str  # OBX-19

    @classmethod
    def of(cls, control_id: str, order_key: str, sent: datetime, collected: datetime) -> _Header:
        return cls(
            control_id,
            order_key,
            hl7_timestamp(sent),
            hl7_timestamp(collected),
            hl7_timestamp(collected + timedelta(minutes=25)),
            hl7_timestamp(collected + timedelta(minutes=70)),
        )


class SyntheticEhr:
    """Deterministic fake EHR and laboratory for a population of CKD patients."""

    def __init__(
        self,
        seed: int = 7,
        patients: int = 300,
        start: datetime = datetime(2025, 6, 1, 9, 0, tzinfo=UTC),
        sending_facility: str = "SANDBOX_LAB",
    ) -> None:
        self.seed = seed
        self.start = _aware(start)
        self.sending_facility = sending_facility
        self._counter = 0
        rng = random.Random(seed)
        self.patients: list[SyntheticPatient] = _make_patients(rng, patients, self.start)

    # -- identifiers -----------------------------------------------------------------------

    def next_control_id(self) -> str:
        """A fresh MSH-10: unique within this instance, the same for the same seed."""
        self._counter += 1
        return f"SBX{self.seed}-{self._counter:08d}"

    def _rng(self, *key: object) -> random.Random:
        # String seeds go through SHA-512: stable across processes and PYTHONHASHSEED.
        return random.Random("|".join([str(self.seed), *map(str, key)]))

    # -- ADT ---------------------------------------------------------------------------------

    def adt(
        self,
        patient: SyntheticPatient,
        event: AdtEvent,
        at: datetime,
        *,
        control_id: str | None = None,
    ) -> bytes:
        """ADT^A01 (admit), ^A04 (register outpatient) or ^A08 (update), structure ADT_A01."""
        at = _aware(at)
        ts = hl7_timestamp(at)
        msh = _msh("SANDBOX_PAS^^L", "SANDBOX_HOSP^^L", ts, f"ADT^{event}^ADT_A01",
                   control_id or self.next_control_id())  # fmt: skip
        # EVN-1 event type (kept for 2.3 receivers), EVN-2 recorded, EVN-5 operator, EVN-6 occurred
        evn = f"EVN|{event}|{ts}|||SBXCLERK^Clerk^Sandbox^^^^^^SANDBOX_HOSP|{ts}"
        segments = [msh, evn, _pid(patient), _pv1(patient, event, at)]
        return _encode(segments)

    # -- ORU ---------------------------------------------------------------------------------

    def oru(
        self,
        patient: SyntheticPatient,
        at: datetime,
        *,
        panel: Panel = "both",
        status: ResultStatus = "F",
        sent_at: datetime | None = None,
        control_id: str | None = None,
    ) -> bytes:
        """ORU^R01 2.5.1 for a specimen collected at ``at`` (OBR-7, OBX-14, SPM-17).

        ``panel`` picks the renal function panel (electrolytes, urea, glucose,
        calcium, creatinine and maybe eGFR), the urine albumin/creatinine order,
        or both. ``status`` P/F/C: a preliminary and its final carry the same
        values; a correction (C) re-measures creatinine and UACR and marks just
        those (and the eGFR) C. ``sent_at`` (MSH-7) defaults to a turnaround of
        1-6 hours after collection.
        """
        at = _aware(at)
        key = f"{patient.mrn}|{hl7_timestamp(at)}"
        base = self._rng("visit", key)
        renal = self._rng("renal", key, "C" if status == "C" else "F")
        # Albumin and phosphate have their own stream, so older panels keep their values.
        serum = self._rng("serum", key)
        if sent_at is None:
            sent_at = at + timedelta(minutes=self._rng("tat", key).randint(60, 360))
        header = _Header.of(control_id or self.next_control_id(), key, sent_at, at)
        orders: list[_Order] = []
        if panel in ("renal", "both"):
            orders.append(_renal_order(patient, at, (base, renal, serum), status))
        if panel in ("uacr", "both"):
            orders.append(_uacr_order(patient, at, base, renal, status))
        pid = _pid(patient)
        return self._oru_bytes(header, pid, _pv1(patient, "ORU", at), orders, patient.lab)

    def renal_oru_for(
        self,
        *,
        age: float,
        female: bool,
        at: datetime,
        creatinine_mg_dl: float | str | None = None,
        creatinine_umol_l: float | str | None = None,
        egfr: float | str | None = None,
        uacr_mg_g: float | str | None = None,
        uacr_mg_mmol: float | str | None = None,
        mrn: str = "MRN0000001",
        national_id: str | None = None,
        control_id: str | None = None,
        status: ResultStatus = "F",
        egfr_code: str = "98979-8",
        uacr_code: str = "9318-7",
        sent_at: datetime | None = None,
        serum: Mapping[str, tuple[float | str, str]] | None = None,
    ) -> bytes:
        """An ORU^R01 carrying exactly the values given, for tests.

        Only the results passed appear: creatinine and/or eGFR in a renal OBR,
        UACR in a urine OBR. Nothing is derived (pass ``egfr`` to get one). A
        float is written as NM; a string is written verbatim into OBX-5 as SN
        when it holds a ``^`` (``">^90"``) and as NM otherwise (``">90"``,
        ``"see note"``). PID-7 is the birth date that gives ``age`` on the
        specimen date (to within half a day). ``serum`` adds the 8-variable
        KFRE's analytes to the renal OBR, ``{"calcium": (2.4, "mmol/L")}``,
        each under the LOINC code of its unit (:data:`SERUM_CODES`).
        """
        at = _aware(at)
        birth = at.date() - timedelta(days=round(age * DAYS_PER_YEAR))
        patient = _explicit_patient(mrn, national_id, birth, "F" if female else "M", at)
        chemistry = _explicit_results(
            (CREATININE_CODE, creatinine_mg_dl, "mg/dL"),
            (CREATININE_CODE, creatinine_umol_l, "umol/L"),
            ((egfr_code, EGFR_CODES.get(egfr_code, "eGFR")), egfr, "mL/min/{1.73_m2}"),
            *_serum_entries(serum or {}),
            status=status,
        )
        urine = _explicit_results(
            ((uacr_code, UACR_CODES.get(uacr_code, "UACR")), uacr_mg_g, "mg/g"),
            ((uacr_code, UACR_CODES.get(uacr_code, "UACR")), uacr_mg_mmol, "mg/mmol"),
            status=status,
        )
        orders = [
            _Order(service, specimen, results, status)
            for service, specimen, results in (
                (_RENAL_SERVICE, _SERUM, chemistry),
                (_UACR_SERVICE, _URINE, urine),
            )
            if results
        ]
        sent = _aware(sent_at) if sent_at is not None else at + timedelta(hours=2)
        header = _Header.of(control_id or self.next_control_id(), f"{mrn}|{at}", sent, at)
        pid = _pid(patient)
        return self._oru_bytes(header, pid, _pv1(patient, "ORU", at), orders, patient.lab)

    def _oru_bytes(
        self, header: _Header, pid: str, pv1: str, orders: list[_Order], lab: LabProfile
    ) -> bytes:
        sent = header.sent
        segments = [
            _msh(
                "SANDBOX_LIS^^L",
                f"{self.sending_facility}^^L",
                sent,
                "ORU^R01^ORU_R01",
                header.control_id,
            ),
            # SFT-1 vendor organisation, SFT-2 version, SFT-3 product, SFT-4 binary id
            "SFT|Sandbox Laboratory Systems^L|1.4|SANDBOX_LIS|1.4.2-synthetic",
            pid,
            pv1,
        ]
        for number, order in enumerate(orders, start=1):
            segments.extend(_order_segments(number, order, header, lab))
        return _encode(segments)

    def bad_messages(self) -> dict[str, bytes]:
        """Deliberately broken inputs for ehrbridge's error paths, keyed by what is wrong.

        missing_pid, unparseable_number_see_note, unparseable_number_hashes (OBX-2 NM
        with a non-number in the creatinine OBX-5), unknown_unit (creatinine in mmol/L),
        unknown_message_type (ZZZ^Z01), non_hl7 (JSON), garbage (random bytes without
        MLLP framing bytes), truncated (cut inside the creatinine OBX), empty.
        """
        return _BadMessages(self).build()

    # -- stream ------------------------------------------------------------------------------

    def stream(
        self, *, start: datetime | None = None, visits_per_patient: int = 4
    ) -> Iterator[tuple[datetime, bytes]]:
        """Chronological (MSH-7, message) pairs ending shortly before ``start``.

        Per patient: a registration (ADT^A04, sometimes ^A01), then
        ``visits_per_patient`` lab visits 2-6 months apart (ORU^R01), with
        occasional ADT^A08 updates, preliminary/final pairs and corrections.
        Messages are built lazily in time order, so control ids rise with time.
        """
        end = _aware(start) if start is not None else self.start
        schedule: list[tuple[datetime, int, int, Callable[[], bytes]]] = []
        for index, patient in enumerate(self.patients):
            events = self._patient_events(patient, end, visits_per_patient)
            schedule.extend((when, index, seq, build) for seq, (when, build) in enumerate(events))
        schedule.sort(key=lambda item: item[:3])
        for when, _index, _seq, build in schedule:
            yield when, build()

    def _patient_events(
        self, patient: SyntheticPatient, end: datetime, visits: int
    ) -> list[tuple[datetime, Callable[[], bytes]]]:
        rng = self._rng("schedule", patient.mrn, hl7_timestamp(end), visits)
        collections = _visit_times(rng, end, visits)
        first = collections[0] if collections else end - timedelta(days=30)
        registered = _clinic_time(rng, first - timedelta(days=rng.uniform(3, 40)))
        event: AdtEvent = "A01" if rng.random() < 0.2 else "A04"
        events: list[tuple[datetime, Callable[[], bytes]]] = [
            (registered, _adt_builder(self, patient, event, registered))
        ]
        for collected in collections:
            events.extend(self._visit_events(rng, patient, collected))
            if rng.random() < 0.15:  # demographics touched between visits
                update = collected + timedelta(days=rng.randint(5, 50), minutes=rng.randint(0, 600))
                if update < end:
                    events.append((update, _adt_builder(self, patient, "A08", update)))
        return events

    def _visit_events(
        self, rng: random.Random, patient: SyntheticPatient, collected: datetime
    ) -> list[tuple[datetime, Callable[[], bytes]]]:
        draw = rng.random()
        panel: Panel = "both" if draw < 0.55 else "renal" if draw < 0.9 else "uacr"
        reported = collected + timedelta(minutes=rng.randint(60, 360))
        plan: list[tuple[datetime, ResultStatus]] = [(reported, "F")]
        oddity = rng.random()
        if oddity < 0.05:  # preliminary first, final a few hours later
            plan = [(reported, "P"), (reported + timedelta(minutes=rng.randint(90, 720)), "F")]
        elif oddity < 0.08:  # the lab corrects the result a day or two later
            plan.append((reported + timedelta(minutes=rng.randint(1440, 4320)), "C"))
        return [
            (when, _oru_builder(self, patient, collected, panel=panel, status=status, sent_at=when))
            for when, status in plan
        ]


# -- patients ------------------------------------------------------------------------------


def _make_patients(rng: random.Random, count: int, start: datetime) -> list[SyntheticPatient]:
    mrns: set[str] = set()
    national_ids: set[str] = set()
    patients = []
    for _ in range(count):
        mrn = _unique(mrns, lambda: f"MRN{rng.randrange(10**6, 10**7)}")
        nhs = _unique(national_ids, lambda: _nhs_test_number(rng))
        patients.append(_make_patient(rng, mrn, nhs, start))
    return patients


def _unique(seen: set[str], draw: Callable[[], str]) -> str:
    value = draw()
    while value in seen:
        value = draw()
    seen.add(value)
    return value


def _nhs_test_number(rng: random.Random) -> str:
    """A 10-digit number in the NHS test range 999..., with a valid modulus-11 check digit."""
    while True:
        digits = [9, 9, 9, *(rng.randrange(10) for _ in range(6))]
        check = 11 - sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True)) % 11
        check = 0 if check == 11 else check
        if check != 10:  # 10 is never issued
            return "".join(map(str, digits)) + str(check)


def _make_patient(rng: random.Random, mrn: str, nhs: str, start: datetime) -> SyntheticPatient:
    age = rng.uniform(30, 90)
    birth = start.date() - timedelta(days=round(age * DAYS_PER_YEAR))
    draw = rng.random()
    sex: Sex = "U" if draw < 0.03 else "F" if draw < 0.5 else "M"
    early = rng.random() < 0.08  # G1-G2 with albuminuria: the only ones with a high eGFR
    baseline = rng.uniform(75, 105) if early else rng.triangular(15, 75, 45)
    uacr = _baseline_uacr(rng, early)
    decline = min(6.0, max(0.0, rng.triangular(0, 6, 1.5) + 0.5 * math.log10(uacr / 30)))
    return SyntheticPatient(
        mrn=mrn,
        national_id=nhs,
        family=rng.choice(_FAMILY),
        given=rng.choice(_GIVEN),
        birth_date=birth,
        sex=sex,
        baseline_egfr=round(baseline, 1),
        egfr_decline_per_year=round(decline, 2),
        baseline_uacr_mg_g=round(uacr, 1),
        uacr_log_change_per_year=round(rng.gauss(0.05, 0.15), 3),
        trajectory_origin=start - timedelta(days=3 * 365),
        diabetic=rng.random() < 0.4,
        lab=_make_lab(rng, sex),
    )


def _baseline_uacr(rng: random.Random, early: bool) -> float:
    if early:
        return rng.uniform(100, 1500)
    if rng.random() < 0.08:  # G3 A1: low albuminuria, the source of "<3" results
        return rng.uniform(1.0, 10.0)
    return min(3000.0, max(10.0, rng.lognormvariate(math.log(80), 1.4)))


def _make_lab(rng: random.Random, sex: Sex) -> LabProfile:
    si = rng.random() < 0.4
    uacr_unit: UacrUnit = "mg/mmol" if si else "mg/g{creat}" if rng.random() < 0.15 else "mg/g"
    return LabProfile(
        creatinine_unit="umol/L" if si else "mg/dL",
        uacr_unit=uacr_unit,
        egfr_unit="mL/min/1.73m2" if rng.random() < 0.2 else "mL/min/{1.73_m2}",
        # No lab can compute CKD-EPI without a sex, so 'U' patients never get an eGFR.
        reports_egfr=sex != "U" and rng.random() < 0.8,
        egfr_code=rng.choices(list(EGFR_CODES), weights=(80, 15, 5))[0],
        uacr_code=rng.choices(list(UACR_CODES), weights=(75, 15, 10))[0],
        caps_egfr_at_90=si or rng.random() < 0.3,
        comparator_style="NM" if rng.random() < 0.25 else "SN",
        sends_analysis_time=rng.random() < 0.5,
        mrn_first=rng.random() < 0.8,
    )


def _explicit_patient(
    mrn: str, national_id: str | None, birth: date, sex: Sex, at: datetime
) -> SyntheticPatient:
    lab = LabProfile("mg/dL", "mg/g", "mL/min/{1.73_m2}", True, "98979-8", "9318-7",
                     False, "SN", False, True)  # fmt: skip
    return SyntheticPatient(
        mrn=mrn, national_id=national_id or "", family="Testperson", given="Explicit",
        birth_date=birth, sex=sex, baseline_egfr=60.0, egfr_decline_per_year=0.0,
        baseline_uacr_mg_g=30.0, uacr_log_change_per_year=0.0, trajectory_origin=at,
        diabetic=False, lab=lab,
    )  # fmt: skip


# -- schedule ------------------------------------------------------------------------------


def _visit_times(rng: random.Random, end: datetime, visits: int) -> list[datetime]:
    """Collection times 2-6 months apart, the last within ~2 months before ``end``."""
    # Leave room for a correction (up to 3 days) and turnaround before `end`.
    moment = end - timedelta(days=rng.uniform(4, 60))
    times = []
    for _ in range(visits):
        times.append(_clinic_time(rng, moment))
        moment -= timedelta(days=rng.uniform(60, 182))
    return sorted(times)


def _clinic_time(rng: random.Random, day: datetime) -> datetime:
    """A weekday morning-to-afternoon time on (or just before) ``day``."""
    moment = day.replace(hour=rng.randint(7, 15), minute=rng.randrange(60),
                         second=rng.randrange(60), microsecond=0)  # fmt: skip
    while moment.weekday() >= 5:  # phlebotomy clinics close at weekends
        moment -= timedelta(days=1)
    return moment


def _adt_builder(
    ehr: SyntheticEhr, patient: SyntheticPatient, event: AdtEvent, at: datetime
) -> Callable[[], bytes]:
    return lambda: ehr.adt(patient, event, at)


def _oru_builder(
    ehr: SyntheticEhr,
    patient: SyntheticPatient,
    collected: datetime,
    *,
    panel: Panel,
    status: ResultStatus,
    sent_at: datetime,
) -> Callable[[], bytes]:
    return lambda: ehr.oru(patient, collected, panel=panel, status=status, sent_at=sent_at)


# -- results -------------------------------------------------------------------------------

_DOCTOR = "NEPH01^Kidneyson^Sandbox^^^Dr"  # XCN: id^family^given^^^prefix
_RENAL_SERVICE = "24362-6^Renal function panel - Serum or Plasma^LN"
_UACR_SERVICE = "UACR^Urine albumin/creatinine ratio^99SBX"  # a local order code, as labs do
_SERUM = "119364003^Serum specimen^SCT"
_URINE = "122575003^Urine specimen^SCT"


def _renal_order(
    patient: SyntheticPatient,
    at: datetime,
    rngs: tuple[random.Random, random.Random, random.Random],  # visit, re-measure, serum
    status: ResultStatus,
) -> _Order:
    base, renal, serum = rngs
    lab = patient.lab
    age = patient.age_at(at)
    true_egfr = patient.true_egfr(at)
    # Sex 'U' uses the male constants for the trajectory; such patients get no eGFR OBX.
    creatinine = creatinine_for_egfr(true_egfr, age, patient.female)
    # Analytical + biological variation ~5%; the rest of the panel follows the true state,
    # so a corrected creatinine leaves it unchanged.
    measured = max(0.2, creatinine * renal.lognormvariate(0.0, 0.05))
    results = _chemistry(patient, true_egfr, creatinine, base, status)
    results.extend(_kfre8_serum(patient, at, serum, status))
    creat_result, reported_mg_dl = _creatinine_result(measured, patient, status)
    results.append(creat_result)
    if lab.reports_egfr:
        results.append(_egfr_result(reported_mg_dl, age, patient, status))
    return _Order(_RENAL_SERVICE, _SERUM, tuple(results), status)


@dataclass(frozen=True, slots=True)
class _Analyte:
    """A panel member other than creatinine: code, display, precision, unit, range."""

    code: str
    text: str
    digits: int
    unit: str
    low: float
    high: float

    @property
    def ref(self) -> str:  # OBX-7 reference range
        return f"{format_number(self.low)}-{format_number(self.high)}"


_ELECTROLYTES = (
    _Analyte("2951-2", "Sodium [Moles/volume] in Serum or Plasma", 0, "mmol/L", 136, 145),
    _Analyte("2823-3", "Potassium [Moles/volume] in Serum or Plasma", 1, "mmol/L", 3.5, 5.1),
    _Analyte("2075-0", "Chloride [Moles/volume] in Serum or Plasma", 0, "mmol/L", 98, 107),
    _Analyte("2028-9", "Carbon dioxide, total [Moles/volume] in Serum or Plasma", 0, "mmol/L",
             22, 29),
)  # fmt: skip
_CONVENTIONAL = (  # urea nitrogen, glucose, calcium in mass units (US labs)
    _Analyte("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", 0, "mg/dL", 7, 20),
    _Analyte("2345-7", "Glucose [Mass/volume] in Serum or Plasma", 0, "mg/dL", 70, 99),
    _Analyte("17861-6", "Calcium [Mass/volume] in Serum or Plasma", 1, "mg/dL", 8.6, 10.3),
)
_SI = (  # urea, glucose, calcium in mmol/L (labs that report creatinine in umol/L)
    _Analyte("22664-7", "Urea [Moles/volume] in Serum or Plasma", 1, "mmol/L", 2.5, 7.8),
    _Analyte("14749-6", "Glucose [Moles/volume] in Serum or Plasma", 1, "mmol/L", 3.9, 6.1),
    _Analyte("2000-8", "Calcium [Moles/volume] in Serum or Plasma", 2, "mmol/L", 2.15, 2.55),
)
# mg/dL -> mmol/L for urea nitrogen (as urea), glucose and calcium, in _SI order.
_SI_FACTORS = (0.357, 1 / 18.016, 0.2495)
# Albumin and phosphate, the rest of the renal function panel (24362-6) and of the
# 8-variable KFRE, in US conventional and in SI units.
_SERUM_CONVENTIONAL = (
    _Analyte("1751-7", "Albumin [Mass/volume] in Serum or Plasma", 1, "g/dL", 3.5, 5.0),
    _Analyte("2777-1", "Phosphate [Mass/volume] in Serum or Plasma", 1, "mg/dL", 2.5, 4.5),
)
_SERUM_SI = (
    _Analyte("1751-7", "Albumin [Mass/volume] in Serum or Plasma", 0, "g/L", 35, 50),
    _Analyte("14879-1", "Phosphate [Moles/volume] in Serum or Plasma", 2, "mmol/L", 0.81, 1.45),
)
# g/dL -> g/L (x 10); mg/dL -> mmol/L for phosphate (P 30.973762 g/mol: / 3.0973762).
_SERUM_SI_FACTORS = (10.0, 10 / 30.973762)
_REFS = {
    (a.code, a.unit): a.ref
    for a in (*_ELECTROLYTES, *_CONVENTIONAL, *_SI, *_SERUM_CONVENTIONAL, *_SERUM_SI)
}
# The LOINC code an explicit KFRE-8 analyte is written under, by its unit
# (renal_oru_for). Total CO2 is what a chemistry panel reports as bicarbonate.
SERUM_CODES: dict[tuple[str, str], tuple[str, str]] = {
    ("albumin", "g/dL"): ("1751-7", "Albumin [Mass/volume] in Serum or Plasma"),
    ("albumin", "g/L"): ("1751-7", "Albumin [Mass/volume] in Serum or Plasma"),
    ("phosphate", "mg/dL"): ("2777-1", "Phosphate [Mass/volume] in Serum or Plasma"),
    ("phosphate", "mmol/L"): ("14879-1", "Phosphate [Moles/volume] in Serum or Plasma"),
    ("bicarbonate", "mmol/L"): ("1963-8", "Bicarbonate [Moles/volume] in Serum or Plasma"),
    ("bicarbonate", "mEq/L"): ("2028-9", "Carbon dioxide, total [Moles/volume] in Serum or Plasma"),
    ("calcium", "mg/dL"): ("17861-6", "Calcium [Mass/volume] in Serum or Plasma"),
    ("calcium", "mmol/L"): ("2000-8", "Calcium [Moles/volume] in Serum or Plasma"),
}


def _chemistry(
    patient: SyntheticPatient,
    egfr: float,
    creatinine: float,
    rng: random.Random,
    status: ResultStatus,
) -> list[_Result]:
    """The rest of the panel; plausible for CKD (K up, bicarbonate down as GFR falls)."""
    shortfall = max(0.0, 60.0 - egfr)
    other_status = "P" if status == "P" else "F"
    electrolytes = (
        rng.gauss(140, 2.5),
        rng.gauss(4.3, 0.35) + shortfall * 0.012,
        rng.gauss(103, 2.5),
        rng.gauss(25, 1.8) - shortfall * 0.06,
    )
    mass = (
        creatinine * rng.uniform(12, 22),  # BUN:creatinine ratio 12-22
        rng.uniform(120, 220) if patient.diabetic else rng.uniform(75, 110),
        rng.gauss(9.3, 0.4) - shortfall * 0.01,
    )
    if patient.lab.si:
        rest = zip(_SI, (v * f for v, f in zip(mass, _SI_FACTORS, strict=True)), strict=True)
    else:
        rest = zip(_CONVENTIONAL, mass, strict=True)
    pairs = [*zip(_ELECTROLYTES, electrolytes, strict=True), *rest]
    return [_ranged(analyte, value, other_status) for analyte, value in pairs]


def _ranged(analyte: _Analyte, value: float, status: str) -> _Result:
    shown = round(value, analyte.digits)
    flag = "L" if shown < analyte.low else "H" if shown > analyte.high else "N"
    text = f"{shown:.{analyte.digits}f}"
    return _Result(analyte.code, analyte.text, text, analyte.unit,
                   _REFS[analyte.code, analyte.unit], flag, status=status)  # fmt: skip


def _kfre8_serum(
    patient: SyntheticPatient, at: datetime, rng: random.Random, status: ResultStatus
) -> list[_Result]:
    """Albumin and phosphate: phosphate rises as GFR falls, albumin falls with albuminuria."""
    shortfall = max(0.0, 60.0 - patient.true_egfr(at))
    albuminuria = max(0.0, math.log10(patient.true_uacr_mg_g(at) / 30.0))
    albumin_g_dl = min(5.2, max(2.0, rng.gauss(4.1, 0.3) - 0.25 * albuminuria))
    phosphate_mg_dl = min(9.0, max(1.8, rng.gauss(3.5, 0.45) + shortfall * 0.03))
    values = (albumin_g_dl, phosphate_mg_dl)
    if patient.lab.si:
        pairs = zip(_SERUM_SI, (v * f for v, f in zip(values, _SERUM_SI_FACTORS, strict=True)),
                    strict=True)  # fmt: skip
    else:
        pairs = zip(_SERUM_CONVENTIONAL, values, strict=True)
    other_status = "P" if status == "P" else "F"
    return [_ranged(analyte, value, other_status) for analyte, value in pairs]


def _serum_entries(
    serum: Mapping[str, tuple[float | str, str]],
) -> list[tuple[tuple[str, str], float | str | None, str]]:
    entries: list[tuple[tuple[str, str], float | str | None, str]] = []
    for analyte, (value, unit) in serum.items():
        code = SERUM_CODES.get((analyte, unit))
        if code is None:
            raise ValueError(f"no LOINC code for {analyte} in {unit}; see SERUM_CODES")
        entries.append((code, value, unit))
    return entries


def _creatinine_result(
    mg_dl: float, patient: SyntheticPatient, status: ResultStatus
) -> tuple[_Result, float]:
    """The creatinine OBX and the creatinine (mg/dL) that the printed value stands for."""
    female = patient.female
    code, text = CREATININE_CODE
    if patient.lab.creatinine_unit == "umol/L":
        shown = round(mg_dl * CREATININE_UMOL_PER_MG_DL)
        low, high = (49, 90) if female else (64, 104)
        flag = "H" if shown > high else "L" if shown < low else "N"
        result = _Result(code, text, str(shown), "umol/L", f"{low}-{high}", flag, status=status)
        return result, shown / CREATININE_UMOL_PER_MG_DL
    rounded = round(mg_dl, 2)
    low_f, high_f = (0.59, 1.04) if female else (0.74, 1.35)
    flag = "H" if rounded > high_f else "L" if rounded < low_f else "N"
    ref = f"{low_f:.2f}-{high_f:.2f}"
    return _Result(code, text, f"{rounded:.2f}", "mg/dL", ref, flag, status=status), rounded


def _egfr_result(
    creatinine_mg_dl: float, age: float, patient: SyntheticPatient, status: ResultStatus
) -> _Result:
    lab = patient.lab
    egfr = round(egfr_ckd_epi_2021(creatinine_mg_dl, age, patient.female))
    value, value_type = str(egfr), "NM"
    if lab.caps_egfr_at_90 and egfr > EGFR_CAP:
        value, value_type = _comparator(">", EGFR_CAP, lab.comparator_style)
    flag = "L" if egfr < 60 else "N"
    unit_system = "UCUM" if lab.egfr_unit == "mL/min/{1.73_m2}" else "L"
    return _Result(lab.egfr_code, EGFR_CODES[lab.egfr_code], value, lab.egfr_unit, ">=60", flag,
                   value_type, status, unit_system, EGFR_NOTE)  # fmt: skip


def _uacr_order(
    patient: SyntheticPatient,
    at: datetime,
    base: random.Random,
    renal: random.Random,
    status: ResultStatus,
) -> _Order:
    lab = patient.lab
    uacr = patient.true_uacr_mg_g(at) * renal.lognormvariate(0.0, 0.3)  # urine CV ~30%
    urine_creat_mg_dl = min(350.0, max(20.0, base.lognormvariate(math.log(110), 0.4)))
    albumin_mg_l = uacr * urine_creat_mg_dl / 100.0
    other = "P" if status == "P" else "F"
    results = [
        _Result("14957-5", "Microalbumin [Mass/volume] in Urine", f"{albumin_mg_l:.1f}",
                "mg/L", status=status),
        _urine_creatinine(urine_creat_mg_dl, lab.si, other),
        _uacr_result(uacr, lab, status),
    ]  # fmt: skip
    return _Order(_UACR_SERVICE, _URINE, tuple(results), status)


def _urine_creatinine(mg_dl: float, si: bool, status: str) -> _Result:
    if si:  # 1 mg/dL = 0.0884 mmol/L
        return _Result("14683-7", "Creatinine [Moles/volume] in Urine",
                       f"{mg_dl * 0.0884:.2f}", "mmol/L", status=status)  # fmt: skip
    return _Result("2161-8", "Creatinine [Mass/volume] in Urine", f"{mg_dl:.1f}", "mg/dL",
                   status=status)  # fmt: skip


def _uacr_result(uacr_mg_g: float, lab: LabProfile, status: ResultStatus) -> _Result:
    mmol = lab.uacr_unit == "mg/mmol"
    factor = UACR_MG_G_PER_MG_MMOL if mmol else 1.0
    floor, limit = (0.3, 3.0) if mmol else (UACR_FLOOR_MG_G, 30.0)
    value, value_type = _uacr_text(uacr_mg_g / factor, mmol), "NM"
    if uacr_mg_g < UACR_FLOOR_MG_G:
        value, value_type = _comparator("<", floor, lab.comparator_style)
    flag = "H" if uacr_mg_g / factor >= limit else "N"
    unit_system = "UCUM" if lab.uacr_unit != "mg/g{creat}" else "L"
    return _Result(lab.uacr_code, UACR_CODES[lab.uacr_code], value, lab.uacr_unit,
                   f"<{format_number(limit)}", flag, value_type, status, unit_system)  # fmt: skip


def _uacr_text(value: float, mmol: bool) -> str:
    if mmol or value < 100:
        return f"{value:.1f}"
    return str(round(value))


def _comparator(sign: str, bound: float, style: ComparatorStyle) -> tuple[str, str]:
    number = format_number(bound)
    # SN (structured numeric): OBX-5.1 comparator, OBX-5.2 number.
    return (f"{sign}^{number}", "SN") if style == "SN" else (f"{sign}{number}", "NM")


def _explicit_results(
    *entries: tuple[tuple[str, str], float | str | None, str], status: str
) -> tuple[_Result, ...]:
    results = []
    for (code, text), value, unit in entries:
        if value is None:
            continue
        if isinstance(value, str):
            value_type, shown = ("SN" if "^" in value else "NM"), value
        else:
            value_type, shown = "NM", format_number(value)
        results.append(_Result(code, text, shown, unit, value_type=value_type, status=status))
    return tuple(results)


# -- segments ------------------------------------------------------------------------------


def _msh(application: str, facility: str, ts: str, message_type: str, control_id: str) -> str:
    # MSH-3/4 sender, 5/6 receiver, 7 time, 9 type, 10 control id, 11 processing id,
    # 12 version, 15/16 accept/application ack type (AL/NE: original-mode ACK over MLLP).
    return (
        f"MSH|^~\\&|{application}|{facility}|{RECEIVING}|{ts}||{message_type}|{control_id}"
        f"|P|{VERSION}|||AL|NE"
    )


def _pid(patient: SyntheticPatient) -> str:
    mrn = f"{patient.mrn}^^^SANDBOX^MR"  # CX.1 id, CX.4 assigning authority, CX.5 type code
    ids = [mrn]
    if patient.national_id:
        nhs = f"{patient.national_id}^^^NHS^NH"
        ids = [mrn, nhs] if patient.lab.mrn_first else [nhs, mrn]
    name = f"{escape_text(patient.family)}^{escape_text(patient.given)}^^^^^L"  # XPN, L = legal
    house = int(patient.mrn[-3:]) if patient.mrn[-3:].isdigit() else 1
    address = f"{house} Synthetic Street^^Sandbox City^^SBX {house % 90 + 10}^^H"
    line = zlib.crc32(patient.mrn.encode()) % 1000
    phone = f"^PRN^PH^^^020^79460{line:03d}"  # Ofcom drama range 020 7946 0xxx
    # PID-3 ids, PID-5 name, PID-7 birth date, PID-8 sex, PID-11 address, PID-13 phone
    birth = f"{patient.birth_date:%Y%m%d}"
    return f"PID|1||{'~'.join(ids)}||{name}||{birth}|{patient.sex}|||{address}||{phone}"


def _pv1(patient: SyntheticPatient, event: str, at: datetime) -> str:
    visit = f"V{patient.mrn[3:]}{at.year % 100:02d}{at.month:02d}{at.day:02d}^^^SANDBOX^VN"
    fields = {
        1: "1",
        2: "O",  # PV1-2 patient class: outpatient
        3: "NEPH^CLINIC^^SANDBOX_HOSP",  # PV1-3 location: point of care^room^bed^facility
        4: "R",  # PV1-4 admission type: routine
        7: _DOCTOR,  # PV1-7 attending doctor
        10: "MED",  # PV1-10 hospital service
        19: visit,  # PV1-19 visit number
    }
    if event == "A01":
        fields |= {2: "I", 3: f"RENAL^W12^B{at.day:02d}^SANDBOX_HOSP", 4: "E"}
        fields[44] = hl7_timestamp(at)  # PV1-44 admit date/time
    return _segment("PV1", fields)


def _segment(name: str, fields: dict[int, str]) -> str:
    """A segment from {field number: value}; absent fields are empty."""
    return "|".join([name, *(fields.get(i, "") for i in range(1, max(fields) + 1))])


def _order_segments(number: int, order: _Order, header: _Header, lab: LabProfile) -> list[str]:
    # Placer/filler numbers: a stable digest of (patient, collection time, order).
    digest = zlib.crc32(f"{header.order_key}|{order.service}".encode()) % 10**8
    placer, filler = f"PL{digest:08d}^SANDBOX_EHR", f"FL{digest:08d}^SANDBOX_LIS"
    collected, received, reported = header.collected, header.received, header.sent
    orc_status = "A" if order.status == "P" else "CM"  # HL7 table 0038: some results / complete
    doctor = _DOCTOR
    segments = [
        f"ORC|RE|{placer}|{filler}||{orc_status}||||{reported}|||{doctor}",
        # OBR-7 observation (collection) time, OBR-14 received, OBR-16 ordering provider,
        # OBR-22 results reported, OBR-24 section (CH chemistry), OBR-25 result status
        f"OBR|{number}|{placer}|{filler}|{order.service}|||{collected}|||||||{received}||{doctor}"
        f"||||||{reported}||CH|{order.status}",
    ]
    analysed = header.analysed if lab.sends_analysis_time else ""
    for set_id, result in enumerate(order.results, start=1):
        segments.append(_obx(set_id, result, collected, analysed))
        if result.note:
            segments.append(f"NTE|1|L|{escape_text(result.note)}")
    # SPM-2 specimen id (EIP: filler EI in component 2), SPM-4 type, SPM-17 collected, 18 received
    segments.append(f"SPM|1|^S{digest:08d}&SANDBOX_LIS||{order.specimen}|||||||||||||"
                    f"{collected}|{received}")  # fmt: skip
    return segments


def _obx(set_id: int, result: _Result, observed: str, analysed: str) -> str:
    # OBX-1 set id, 2 value type, 3 LOINC, 5 value, 6 units (CE), 7 range, 8 flag, 11 status,
    # 14 observation time, 19 analysis time
    line = (
        f"OBX|{set_id}|{result.value_type}|{result.code}^{_escaped(result.text)}^LN||"
        f"{result.value}|{result.unit}^^{result.unit_system}|{result.ref}|{result.flag}|||"
        f"{result.status}|||{observed}"
    )
    return f"{line}|||||{analysed}" if analysed else line


def _encode(segments: list[str]) -> bytes:
    # Segment terminator is CR (HL7 2.x ch. 2); the content is ASCII by construction.
    return ("\r".join(segments) + "\r").encode("ascii")


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


# -- deliberately bad messages -------------------------------------------------------------


class _BadMessages:
    """Messages that must fail ingest, each for the one reason its key names."""

    def __init__(self, ehr: SyntheticEhr) -> None:
        self.ehr = ehr
        self.at = ehr.start - timedelta(days=1)

    def good(self, creatinine: float | str = 1.42) -> bytes:
        """A valid renal ORU^R01 with a fresh control id, the base of most bad ones."""
        return self.ehr.renal_oru_for(
            age=64.0, female=True, at=self.at, creatinine_mg_dl=creatinine, egfr=41,
            uacr_mg_g=120.0, mrn="MRN0000042", national_id="9990000018",
        )  # fmt: skip

    def build(self) -> dict[str, bytes]:
        return {
            "missing_pid": self._without_patient(),
            "unparseable_number_see_note": self.good("see note"),
            "unparseable_number_hashes": self.good("####"),
            # mmol/L is a real unit, but not one the sandbox mapping converts for creatinine.
            "unknown_unit": self.good().replace(b"|mg/dL^^UCUM|", b"|mmol/L^^UCUM|"),
            "unknown_message_type": self.good().replace(b"|ORU^R01^ORU_R01|", b"|ZZZ^Z01^ZZZ_Z01|"),
            "non_hl7": self._json(),
            "garbage": self._garbage(),
            "truncated": self._truncated(),
            "empty": b"",
        }

    def _without_patient(self) -> bytes:
        # PV1 belongs to the PATIENT group, so it goes with the PID.
        segments = self.good().decode("ascii").rstrip("\r").split("\r")
        kept = [s for s in segments if s[:3] not in ("PID", "PV1")]
        return ("\r".join(kept) + "\r").encode("ascii")

    @staticmethod
    def _json() -> bytes:
        observation = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
            "valueQuantity": {"value": 1.42, "unit": "mg/dL"},
        }
        return json.dumps(observation).encode("ascii")

    def _garbage(self) -> bytes:
        rng = self.ehr._rng("garbage")
        # No MLLP framing bytes (VT 0x0b, FS 0x1c), so a test can still frame it.
        allowed = [b for b in range(256) if b not in (0x0B, 0x1C)]
        return bytes(rng.choice(allowed) for _ in range(512))

    def _truncated(self) -> bytes:
        # Cut inside the creatinine OBX, right after OBX-4: OBX-5 onwards is lost.
        text = self.good().decode("ascii")
        obx_start = text.index(f"|{CREATININE_CODE[0]}^")
        cut = text.index("||", obx_start) + 2
        return text[:cut].encode("ascii")
