"""Rewrite passes (torch.fx `PassBase`, one per file): each edits the analysed graph for a choice of kept units
and declares its contract (`requires` / `ensures`, checked by `fxprune.analysis.contracts`)."""
