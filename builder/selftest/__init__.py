"""`samebox selftest`: a GPU self-test before long jobs: health, numerics, kernels, environment.

Readings (readings.py) are collected once from NVML, torch and the filesystem; checks (registry.py) are pure
functions over them returning Findings; the runner turns both into a Report.
"""

from builder.selftest.findings import Finding
from builder.selftest.report import JSON_SCHEMA, Report
from builder.selftest.runner import report_from_readings, run_selftest

__all__ = ["JSON_SCHEMA", "Finding", "Report", "report_from_readings", "run_selftest"]
