"""Stage 5, rewrite: run the rewrite passes under a checking PassManager and emit the pruned GraphModule."""
