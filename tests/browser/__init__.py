# A package, so that its conftest is imported as browser.conftest and never replaces
# tests/conftest.py as the module `conftest` (which most tests import wait_for from).
