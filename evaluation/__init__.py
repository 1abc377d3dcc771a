"""How well a model works at this site: outcomes, linkage, metrics and the report.

Domain core: pure functions over predictions and events, no files, sockets or
databases (the CLI in ``ehrbridge/evaluate.py`` reads and writes). Modules:

- ``outcomes``: a model's outcome declared in YAML (codes, labs, horizons) and
  the events it is recognised from (FHIR resources, a site code map);
- ``linkage``: each prediction linked to *event*, *no event*, *censored* or
  *pending*, incrementally as events arrive;
- ``metrics``: discrimination, calibration, threshold burden, subgroup audit,
  coverage, computed with scikit-learn and statsmodels;
- ``report``: the JSON with every number, the figures and the offline HTML.

Needs the ``evaluate`` extra (``pip install 'ehrbridge[evaluate]'``).
"""
