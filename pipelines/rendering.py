"""How a model's results are shown: its model file's ``rendering``, with the site's overrides.

The Observation (``observation.py``), the ORU^R01 (``oru.py``) and the CDS
Hooks card (``ehrbridge/cds_hooks.py``) read every code, band and phrase from
here, and here from the model file (``mappings/model_file.py``, "rendering"):
no builder knows a model's output names. A site may still replace the
Observation code (``writeback.code``), the interpretation bands
(``writeback.interpretation``) and the ORU codes (``writeback.hl7v2.order``,
``writeback.hl7v2.results``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ehrbridge.config import SiteConfig
from ehrbridge.mappings.model_file import Card, Coding, Hl7Coding, ModelFile, RenderedOutput


@dataclass(frozen=True, slots=True)
class Band:
    output: str  # the output's name
    at_least: float  # a fraction
    code: str  # v3-ObservationInterpretation code (H, HH), also OBX-8
    display: str


@dataclass(frozen=True, slots=True)
class Shown:
    """Everything the builders need to render one model's results at one site."""

    model: ModelFile
    code: Coding  # Observation.code
    components: tuple[RenderedOutput, ...]  # in the order they are shown
    bands: tuple[Band, ...]  # the first one reached wins
    order: Hl7Coding  # OBR-4
    obx: dict[str, Hl7Coding]  # output -> OBX-3
    card: Card

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(c.output for c in self.components)

    def band(self, outputs: dict[str, float]) -> tuple[str, str]:
        """The code and display of the first band the results reach; N if none."""
        for band in self.bands:
            if outputs[band.output] >= band.at_least:
                return band.code, band.display
        return "N", "Normal"

    def flag(self, output: str, value: float) -> str:
        """OBX-8: the first band of this output the value reaches, else N."""
        for band in self.bands:
            if band.output == output and value >= band.at_least:
                return band.code
        return "N"

    def thresholds(self, output: str) -> list[float]:
        return [b.at_least for b in self.bands if b.output == output]

    def method_text(self, calibration: str) -> str:
        """A calibration in words, as the model file states it."""
        return self.model.shown.calibration_text.get(calibration, calibration)


def shown(config: SiteConfig, model: ModelFile | None = None) -> Shown:
    """The rendering of ``model`` (default: the site's model) at ``config``'s site."""
    definition = model or config.model.declared
    rendering = definition.shown
    wb = config.writeback
    code = (
        Coding(system=wb.code.system, code=wb.code.code, display=wb.code.display)
        if wb.code is not None
        else rendering.code
    )
    bands = tuple(
        Band(rendering.output_of(b.output), b.at_least, b.code, b.display)
        for b in (wb.interpretation if wb.interpretation is not None else rendering.interpretation)
    )
    hl7 = wb.hl7v2
    overrides = hl7.results if hl7 is not None else {}
    obx = {
        c.output: _hl7(overrides.get(c.output) or overrides.get(c.key or c.output)) or c.hl7
        for c in rendering.components
    }
    order = _hl7(hl7.order if hl7 is not None else None) or rendering.order
    return Shown(definition, code, tuple(rendering.components), bands, order, obx, rendering.card)


def shown_for(config: SiteConfig, model_name: str) -> Shown:
    """The rendering of the site's model a result names (``models:``), else the first's."""
    return shown(config, config.model_named(model_name).declared)


def _hl7(code: object) -> Hl7Coding | None:
    if code is None:
        return None
    return Hl7Coding.model_validate(code, from_attributes=True)
