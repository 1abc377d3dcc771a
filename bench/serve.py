"""Run one sandbox server as a process of its own, for the benchmarks.

    python -m ehrbridge.bench.serve model|fhir|naive-cds --port PORT [--fhir URL --patient-system S]
        [--latency-ms MS --row-latency-ms MS]   # model: a slower endpoint

The model server and the FHIR stand-in run in separate processes during a
benchmark so that each one's CPU can be read from ``/proc`` and none of them
competes for the GIL of the site being measured.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import uvicorn


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("server", choices=["model", "fhir", "naive-cds"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fhir", default="", help="FHIR base (naive-cds)")
    parser.add_argument("--patient-system", default="", help="identifier system (naive-cds)")
    from ehrbridge.sandbox.model_server import add_latency_arguments, latency_from

    add_latency_arguments(parser)  # model
    args = parser.parse_args(argv)
    app: Any
    if args.server == "model":
        from ehrbridge.sandbox.model_server import create_model_app

        app = create_model_app(latency=latency_from(args))
    elif args.server == "fhir":
        from ehrbridge.sandbox.fhir_server import create_fhir_app

        app = create_fhir_app()
    else:
        from ehrbridge.bench.naive import create_naive_cds_app

        app = create_naive_cds_app(args.fhir, args.patient_system)
    # The same settings as ehrbridge._http.EmbeddedServer: no access log.
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning", lifespan="off"
    )


if __name__ == "__main__":
    main()
