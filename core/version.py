"""The ehrbridge version, where FHIR Device/Provenance writers can read it
without importing the facade (``ehrbridge/__init__.py`` re-exports it)."""

__version__ = "0.1.0"
