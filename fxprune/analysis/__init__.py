"""Stage 1-2, analysis: capture a model with torch.export, label every tensor dimension with atoms (one rule
per ATen op family), and group the coupled dimensions into prunable units. Imports nothing else of fxprune."""
