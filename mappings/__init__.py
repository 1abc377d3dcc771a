"""Site mappings: how one hospital's messages become model features.

Start with ``mappings/README.md`` (onboarding a site, with a worked example).

* :mod:`.schema` -- the YAML format (pydantic, every model forbids unknown fields);
* :mod:`.units` -- the units labs use for each feature, and their factors;
* :mod:`.codemaps` -- local code → standard concept: inline, CSV, FHIR ConceptMap;
* :mod:`.lint` -- semantic checks with file:line; :mod:`.loader` -- loading, and
  ``mapping: {file: ...}`` in a site config;
* :mod:`.testing`, :mod:`.explain`, :mod:`.unmapped`, :mod:`.cli` -- the
  ``ehrbridge mappings test|explain|unmapped|check`` commands;
* :mod:`.ckd_epi` -- eGFR from creatinine (CKD-EPI 2021), for derived eGFR;
* ``sites/`` -- example sites, each with sample messages and ``*_test.yaml`` cases.
"""
