"""`samebox selftest`: a GPU self-test before long jobs: health, numerics, kernels, environment.

Each check is one declaration in registry.py: the probe whose reading it judges (probes.py), its judge, its modes.
The collector (readings.py) takes each reading the mode's checks need once, from NVML, torch and the filesystem;
the judges read only those readings (and the catalog, for image hints) and return Findings; the runner turns both
into a Report.
"""

from builder.selftest.findings import Finding
from builder.selftest.report import JSON_SCHEMA, Report
from builder.selftest.runner import report_from_readings, run_selftest

__all__ = ["JSON_SCHEMA", "Finding", "Report", "report_from_readings", "run_selftest"]
