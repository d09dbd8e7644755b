"""Streaming: run a captured graph one decoder layer at a time, its weights read from a checkpoint on demand.

For models larger than memory: the graph is captured on the meta device (`weights.empty_model` builds the
skeleton from a checkpoint's config), cut into one segment per decoder layer plus the embedding and the head
(`partition`, from the graph's residual stream and attention ops, never from names), and run segment-major
by `StreamedExecutor`: every calibration batch passes segment k before segment k+1 starts, each tensor is
read from the `WeightSource` (safetensors shards, or an in-memory model) when its first segment starts and
dropped after its last, and between segments only the handed-on values are kept (spilled to disk past a
byte budget). A backward sweep (`backward`) recomputes the segments in reverse order from their stored inputs
for the gradients of the LM loss (`streamed_gradients`); `streamed_score` gives every estimator's scores
(l2, wanda, flap, obs, element1, element2, vector) and HyWIA's (`streamed_hywia`) through them.
`StreamedRefit` refits the pruned projections as the output is written, the dense and the pruned stream side
by side (`fxprune.serialization.save_streamed(..., calibration=...)`).

    model = empty_model(checkpoint_dir)                  # meta parameters, no weight read
    executor = StreamedExecutor(analyze(model), CheckpointWeights(checkpoint_dir, model), budget=2**30)
    scores = streamed_score(executor, method="flap", calibration=ids)
    plan = make_plan(executor.dg, PruneConfig(ratio=0.2, importance="flap"), scores)
"""
from fxprune.streaming.executor import SourceTensors, StreamedExecutor, StreamError
from fxprune.streaming.partition import PartitionError, Segment, partition
from fxprune.streaming.backward import backward_sweep
from fxprune.streaming.gradients import streamed_gradients
from fxprune.streaming.hywia import StreamedObjective, streamed_hywia
from fxprune.streaming.refit import StreamedRefit
from fxprune.streaming.scores import streamable, streamed_score
from fxprune.streaming.statistics import streamed_input_statistics
from fxprune.streaming.store import ActivationStore
from fxprune.streaming.weights import CheckpointWeights, ModelWeights, WeightSource, empty_model

__all__ = ["StreamedExecutor", "StreamError", "SourceTensors", "PartitionError", "Segment", "partition",
           "streamed_input_statistics", "streamed_score", "streamable", "backward_sweep", "streamed_gradients",
           "streamed_hywia", "StreamedObjective", "StreamedRefit", "ActivationStore", "CheckpointWeights", "ModelWeights",
           "WeightSource", "empty_model"]
