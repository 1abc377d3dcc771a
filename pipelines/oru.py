"""A result as an HL7v2 ORU^R01, for EHRs that take results only over MLLP.

Layout (v2.5.1 by default, ``writeback.hl7v2`` in the site config), one
field per line here::

    MSH  |^~\\&|EHRBRIDGE|<site>|<EHR app>|<EHR facility>|<now>||ORU^R01^ORU_R01
         |<control id>|P|2.5.1
    PID  |1||<patient id>^^^<assigning authority>^<type>||<family>^<given>^<middle>
    OBR  |1||<prediction identifier>^EHRBRIDGE|KFRE^Kidney failure risk^99EHB
         |||<anchor>| ... |<now> (OBR-22)| ... |F (OBR-25)
    NTE  |1|L|Model kfre-4var 1.0.0 (north_american); mapping <version>; inputs: ...
    OBX  |1|NM|KFRE2Y^Kidney failure risk within 2 years^99EHB||12.3456|%^percent^UCUM
         |<10|H|||F|||<anchor>|||<model> (OBX-17)||<now> (OBX-19)
    OBX  |2|NM|KFRE5Y^... (the next output, the same way)

* OBR-4 and each output's OBX-3 come from the model file's ``rendering``
  (``order``, ``components[].hl7``) unless the site names its own; one OBX
  per output, in the rendering's order; OBX-5 the value in percent;
  OBX-6 UCUM ``%``; OBX-7 the reference range (below the lowest threshold
  band of that output, e.g. ``<10``); OBX-8 the abnormal flag of the first
  band the value reaches (``H``, ``HH``), else ``N``; OBX-14 the anchor time
  of the input results; OBX-17 the model (name, version, calibration);
* OBR-3 (filler order number) is the prediction identifier, stable across
  replays, so the EHR files an update of the same result under the same
  order; OBR-25 and OBX-11 say ``F`` (final), or ``C`` (corrected) when a
  result with that identifier was sent before with other values;
* MSH-10 is deterministic in the content (identifier, values, status): a
  resend after an ACK timeout carries the **same** control id, so the
  receiver can de-duplicate, while a corrected result gets a new one;
* PID-5 (name, required from v2.5) is the name the EHR sent with the results
  (PID-5 or Patient.name), else the site's placeholder (``UNKNOWN^^^^^^S``:
  HL7 table 0200 ``S``, a pseudonym). Receivers match the patient on PID-3;
  the name is PHI and is never logged.

Assembled as strings, like the ACKs: about 0.1 ms per message, where
building it with hl7apy's object model takes about 24 ms (measured on the
development machine) -- at a hundred results a second that alone would need
two and a half cores. The tests parse every message we build with hl7apy
and validate it against the ORU_R01 structure of its version.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime

from ehrbridge.config import Hl7v2Writeback, PlaceholderName, SiteConfig
from ehrbridge.mappings.model_file import Hl7Coding
from ehrbridge.pipelines.domain import bounded_note
from ehrbridge.pipelines.er7 import Encoding, escape
from ehrbridge.pipelines.facts import PersonName
from ehrbridge.pipelines.hl7time import format_dtm
from ehrbridge.pipelines.records import Prediction
from ehrbridge.pipelines.rendering import Shown, shown_for

ENCODING = Encoding(field="|", component="^", repetition="~", escape="\\", subcomponent="&")
UCUM_PERCENT = "%^percent^UCUM"
FILLER_NAMESPACE = "EHRBRIDGE"
_DELIMITERS = re.compile(r"[|^~\\&\r\n]")


def control_id(prediction: Prediction, status: str) -> str:
    """MSH-10: the same for the same content, at most 20 characters (ST in v2.3-2.6)."""
    values = "|".join(f"{v!r}" for v in prediction.outputs.values())
    material = f"{prediction.identifier}|{values}|{status}"
    return "EB" + hashlib.sha256(material.encode()).hexdigest()[:18].upper()


def risk_text(fraction: float) -> str:
    """A risk in percent as an NM value: at most four decimals, no exponent."""
    text = f"{fraction * 100.0:.4f}".rstrip("0").rstrip(".")
    return text or "0"


def reference_range(view: Shown, output: str) -> str:
    """OBX-7: below the lowest threshold of this output (``<10``), or empty."""
    thresholds = view.thresholds(output)
    return f"<{risk_text(min(thresholds))}" if thresholds else ""


def build_oru(
    prediction: Prediction,
    config: SiteConfig,
    *,
    corrected: bool = False,
    now: datetime | None = None,
) -> tuple[bytes, str]:
    """The ORU^R01 of one result, and its MSH-10."""
    target = config.writeback.hl7v2
    if target is None:
        raise ValueError("writeback.hl7v2 is not configured")
    status = "C" if corrected else "F"
    view = shown_for(config, prediction.model.name)
    msh_10 = control_id(prediction, status)
    stamp = format_dtm((now or datetime.now(UTC)).astimezone(UTC))
    segments = [
        _msh(target, config.site, stamp, msh_10),
        _pid(prediction, config, target.unknown_name),
        _obr(prediction, view.order, stamp, status),
        _nte(prediction),
        *(
            _obx(number, output, prediction, view, (stamp, status))
            for number, output in enumerate(view.outputs, start=1)
        ),
    ]
    return ("\r".join(segments) + "\r").encode("utf-8"), msh_10


def _e(text: str) -> str:
    return escape(text, ENCODING) if _DELIMITERS.search(text) else text


def _cwe(code: Hl7Coding) -> str:
    return "^".join([_e(code.code), _e(code.text), _e(code.system)])


def _msh(target: Hl7v2Writeback, site: str, stamp: str, msh_10: str) -> str:
    return "|".join(
        [
            "MSH",
            "^~\\&",
            _e(target.sending_application),  # MSH-3
            _e(target.sending_facility or site),  # MSH-4
            _e(target.receiving_application),  # MSH-5
            _e(target.receiving_facility),  # MSH-6
            stamp,  # MSH-7
            "",  # MSH-8 security
            "ORU^R01^ORU_R01",  # MSH-9
            msh_10,  # MSH-10
            _e(target.processing_id),  # MSH-11
            _e(target.version),  # MSH-12
        ]
    )


def _xpn(name: PersonName | None, placeholder: PlaceholderName) -> str:
    """PID-5 as XPN: family (XPN.1), given (.2), further given (.3); or the placeholder."""
    if name is None:
        return f"{_e(placeholder.family)}^^^^^^{placeholder.name_type}"  # XPN.7 name type
    return "^".join([_e(name.family), _e(name.given), _e(name.middle)]).rstrip("^")


def _pid(prediction: Prediction, config: SiteConfig, placeholder: PlaceholderName) -> str:
    rule = config.mapping.patient
    if rule.assigning_authority:
        authority = _e(rule.assigning_authority)  # CX.4 HD.1 namespace id
    else:
        # CX.4 HD.2/HD.3: the FHIR identifier system as a universal id of type URI.
        authority = "&" + _e(prediction.patient_system) + "&URI"
    cx = "^".join([_e(prediction.patient_id), "", "", authority, _e(rule.type_code or "MR")])
    name = _xpn(prediction.patient_name, placeholder)
    # PID-1 set id, PID-3 patient identifier list, PID-5 patient name
    return "|".join(["PID", "1", "", cx, "", name])


def _obr(prediction: Prediction, order: Hl7Coding, stamp: str, status: str) -> str:
    fields = [""] * 26
    fields[0] = "OBR"
    fields[1] = "1"  # OBR-1 set id
    fields[3] = f"{prediction.identifier}^{FILLER_NAMESPACE}"  # OBR-3 filler order number
    fields[4] = _cwe(order)  # OBR-4 universal service identifier
    fields[7] = format_dtm(prediction.anchor)  # OBR-7 observation date/time
    fields[22] = stamp  # OBR-22 results report/status change
    fields[25] = status  # OBR-25 result status
    return "|".join(fields)


def _nte(prediction: Prediction) -> str:
    model = prediction.model
    inputs = "; ".join(
        f"{f.feature} {f.comparator}{f.value:g} {f.unit} ({f.effective.date()})"
        for f in prediction.features.inputs
    )
    text = (
        f"Model {model.name} {model.version} ({model.calibration} calibration), "
        f"mapping {prediction.mapping_version}; inputs: {inputs}"
    )
    bounded = bounded_note(prediction.features)  # the true risk may differ: say so
    if bounded:
        text += f". {bounded}"
    return "|".join(["NTE", "1", "L", _e(text)])  # NTE-2 source: L ancillary (filler)


def _obx(
    number: int,
    output: str,
    prediction: Prediction,
    view: Shown,
    stamp_status: tuple[str, str],
) -> str:
    stamp, status = stamp_status
    fraction = prediction.outputs[output]
    code = view.obx[output]
    model = prediction.model
    method = "^".join(
        [_e(model.name), _e(f"{model.name} {model.version} {model.calibration}"), "99EHB"]
    )
    fields = [""] * 20
    fields[0] = "OBX"
    fields[1] = str(number)  # OBX-1 set id
    fields[2] = "NM"  # OBX-2 value type
    fields[3] = _cwe(code)  # OBX-3 observation identifier
    fields[4] = "1"  # OBX-4 sub-id: required from v2.7; each OBX is its own observation
    fields[5] = risk_text(fraction)  # OBX-5 value
    fields[6] = UCUM_PERCENT  # OBX-6 units
    fields[7] = _e(reference_range(view, output))  # OBX-7 reference range
    fields[8] = view.flag(output, fraction)  # OBX-8 abnormal flags
    fields[11] = status  # OBX-11 result status
    fields[14] = format_dtm(prediction.anchor)  # OBX-14 observation date/time
    fields[17] = method  # OBX-17 observation method
    fields[19] = stamp  # OBX-19 date/time of the analysis
    return "|".join(fields)
