"""Stage 4, planning: the settings (`PruneConfig`) and the choice of units to remove (`PrunePlan`), to the exact
ratio, with protection, rounding and GQA consistency."""
