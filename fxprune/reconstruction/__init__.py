"""Stage 6, reconstruction: least-squares refit of the projections that lost inputs, towards the dense model."""
