"""``ehrbridge dlq list|show|replay`` on a site whose log is Apache Kafka.

The commands read ``<site>.dlq`` and ``<site>.dlq.replayed`` without a
consumer group. Both topics have one partition on Kafka, so an offset
names one dead letter for the whole site, as it does on the embedded log.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ehrbridge.cli import main
from ehrbridge.config import load_site_config
from ehrbridge.core.contracts import Envelope, Failure, Kind
from ehrbridge.core.errors import EhrbridgeError, MessageUnusable, UpstreamUnavailable
from ehrbridge.pipelines.transport import Log, dead_letter_record, topic_name
from ehrbridge.sandbox.run import sandbox_site_file
from ehrbridge.stores import open_log

pytestmark = pytest.mark.kafka

UNIT_MESSAGE = (
    b"MSH|^~\\&|LAB|H|||20260101||ORU^R01|CTRL-UNIT|P|2.5.1\rOBX|1|NM|2160-0||1.4|mg/furlong\r"
)
MODEL_MESSAGE = (
    b"MSH|^~\\&|LAB|H|||20260101||ORU^R01|CTRL-MODEL|P|2.5.1\rOBX|1|NM|2160-0||1.4|mg/dL\r"
)


@pytest.fixture
def site_file(tmp_path: Path, kafka_bootstrap: str) -> Path:
    """The sandbox site, renamed (fresh topics) and moved onto the Kafka transport."""
    data = yaml.safe_load(sandbox_site_file().read_text())
    data["site"] = f"dlq{uuid.uuid4().hex[:8]}"
    data["data_dir"] = str(tmp_path / "data")
    data["transport"] = {"kind": "kafka", "bootstrap": kafka_bootstrap, "partitions": 3}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@pytest.fixture
def log(site_file: Path) -> Iterator[Log]:
    opened = open_log(load_site_config(site_file))
    yield opened
    opened.close()


def dead_letter(site: str, payload: bytes, key: str, error: EhrbridgeError, stage: str) -> Failure:
    envelope = Envelope(site=site, payload=payload, kind=Kind.HL7V2, source_id=key, key=key)
    return Failure(envelope, error, stage)


def park(log: Log, site: str) -> None:
    """Two dead letters: an unknown unit (ingest) and a model that never came back."""
    unit = dead_letter(
        site,
        UNIT_MESSAGE,
        "CTRL-UNIT",
        MessageUnusable("OBX-6 unit not mapped", reason="unit.unknown"),
        "ingest",
    )
    model = dead_letter(
        site,
        MODEL_MESSAGE,
        "CTRL-MODEL",
        UpstreamUnavailable("model server 503", reason="model.unavailable"),
        "process",
    )
    dlq = topic_name(site, "dlq")
    log.append([dead_letter_record(unit, dlq), dead_letter_record(model, dlq)])


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_list_and_show_read_dead_letters_from_kafka(
    site_file: Path, log: Log, capsys: pytest.CaptureFixture[str]
) -> None:
    site = load_site_config(site_file).site
    park(log, site)
    code, listing = run_cli(capsys, "dlq", "list", "--config", str(site_file))
    assert code == 0
    assert "2 dead letter(s)" in listing
    assert "unit.unknown" in listing and "model.unavailable" in listing
    offsets = [r.offset for r in log.read(topic_name(site, "dlq"))]
    assert offsets == [0, 1]  # one partition: offsets number the site's dead letters

    code, shown = run_cli(capsys, "dlq", "show", "--config", str(site_file), str(offsets[1]))
    assert code == 0
    assert "error.reason: model.unavailable" in shown
    assert "CTRL-MODEL" in shown and "mg/dL" in shown
    assert run_cli(capsys, "dlq", "show", "--config", str(site_file), "99")[0] == 1


def test_replay_selects_by_reason_and_does_not_replay_twice(
    site_file: Path, log: Log, capsys: pytest.CaptureFixture[str]
) -> None:
    site = load_site_config(site_file).site
    park(log, site)
    config = str(site_file)
    code, out = run_cli(capsys, "dlq", "replay", "--config", config, "--reason", "model.*")
    assert code == 0 and "replayed 1 record(s)" in out

    raw = log.read(topic_name(site, "raw"), limit=1000)
    assert [r.value for r in raw] == [MODEL_MESSAGE]
    assert raw[0].key == "CTRL-MODEL"
    assert raw[0].headers["replayed_from"] == "1"
    assert not any(name.startswith("error.") for name in raw[0].headers)

    code, out = run_cli(capsys, "dlq", "replay", "--config", config, "--reason", "model.*")
    assert "replayed 0 record(s)" in out  # the marker on dlq.replayed remembers it
    _, listing = run_cli(capsys, "dlq", "list", "--config", config, "--reason", "model.*")
    assert "yes" in listing.splitlines()[1]

    run_cli(capsys, "dlq", "replay", "--config", config, "--reason", "model.*", "--again")
    assert len(log.read(topic_name(site, "raw"), limit=1000)) == 2
