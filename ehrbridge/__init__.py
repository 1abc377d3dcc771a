"""ehrbridge: put a clinical prediction model into a hospital's EHR workflow.

The public facade. Everything not listed in ``__all__`` is internal and may
change without notice; start reading at ``ehrbridge.pipelines.contracts``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
