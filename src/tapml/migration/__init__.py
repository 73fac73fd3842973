"""Migration and localization: mixed reference/target runs, end-to-end verdicts, localizer strategies."""

from tapml.migration.localize import (STRATEGIES, Culprit, E2EVerdict, Localization, compare_runs, localize,  # noqa: I001
                                    migrate)
from tapml.migration.mixed import MixedRun, RunResult, run_mixed
from tapml.migration.placement import Placement

__all__ = ["STRATEGIES", "Culprit", "E2EVerdict", "Localization", "MixedRun", "Placement", "RunResult",
           "compare_runs", "localize", "migrate", "run_mixed"]
