"""The sandbox's FHIR R4 server, now the package :mod:`ehrbridge.sandbox.fhir`.

This module stays so that ``python -m ehrbridge.sandbox.fhir_server`` (README,
mappings/README.md) and existing imports keep working; it re-exports the
package's public names rather than listing them a second time.
"""

from __future__ import annotations

from ehrbridge.sandbox import fhir as _package
from ehrbridge.sandbox.fhir import *  # noqa: F403
from ehrbridge.sandbox.fhir.app import main

__all__ = list(_package.__all__)

if __name__ == "__main__":
    main()
