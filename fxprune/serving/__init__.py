"""Stage 8, serving: KV-cache generation with programs captured once over the kept heads."""
