"""Every HL7v2 message of the shared corpus, sent over MLLP, gets an ACK.

About 800 messages from several public projects: versions 2.2-2.8, CR/LF/CRLF,
Z-segments, escapes, batches, XML encodings and deliberately malformed ones.
None of them may crash or stall the listener: each gets AA, AE or AR, with
MSA-2 echoing its MSH-10 whenever it has one, and the listener still answers
a good message at the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from conftest import CORPUS

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.bench.fuzz import corpus_files, messages_in
from ehrbridge.config import SiteConfig
from ehrbridge.pipelines.ack import read_header
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


def first_pid3_repetition(config: SiteConfig) -> SiteConfig:
    """The corpus comes from many senders: take whatever PID-3 repetition 1 holds."""
    patient = config.mapping.patient.model_copy(
        update={"assigning_authority": None, "type_code": None, "repetition": 1}
    )
    mapping = config.mapping.model_copy(update={"patient": patient})
    return config.model_copy(update={"mapping": mapping})


@pytest.fixture(scope="module")
def corpus_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    data_dir = tmp_path_factory.mktemp("corpus")
    with BackgroundSandbox(data_dir, configure=first_pid3_repetition) as running:
        yield running


def test_every_corpus_message_gets_an_ack(corpus_site: BackgroundSandbox) -> None:
    sandbox = corpus_site
    files = corpus_files(CORPUS / "hl7v2")
    assert len(files) > 600, f"corpus not found or incomplete at {CORPUS}"
    codes: Counter[str] = Counter()
    port = sandbox.sandbox.mllp_port
    with MllpClient("127.0.0.1", port, timeout_s=15) as client:
        for path in files:
            for message in messages_in(path.read_bytes()):
                ack = client.send(message)
                assert ack.code in {"AA", "AE", "AR"}, f"{path}: {ack.raw!r}"
                expected_id = read_header(message).control_id
                assert ack.control_id == expected_id, f"{path}: MSA-2 does not echo MSH-10"
                codes[ack.code] += 1
    assert sum(codes.values()) > 700
    assert codes["AA"] > 0 and codes["AE"] > 0 and codes["AR"] > 0, codes
    print(f"\ncorpus over MLLP: {sum(codes.values())} messages, {dict(codes)}")

    good = SyntheticEhr(seed=3, patients=1).renal_oru_for(
        age=50,
        female=True,
        at=datetime(2026, 3, 1, tzinfo=UTC),
        egfr=40.0,
        uacr_mg_g=80.0,
        control_id="AFTER-CORPUS",
    )
    with MllpClient("127.0.0.1", port) as client:
        ack = client.send(good)
    assert (ack.code, ack.control_id) == ("AA", "AFTER-CORPUS")
