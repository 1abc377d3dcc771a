"""``python -m ehrbridge.sandbox.fhir``: the EHR stand-in on its own."""

from ehrbridge.sandbox.fhir.app import main

main()
