"""Every key fxprune writes into `node.meta` or `GraphModule.meta`, in one place.

Node keys live on the analysed graph and are shared by the rewritten copy (graph_copy keeps meta);
`meta["val"]` (torch.export's fake tensor) is refreshed on the pruned graph by its verification.
"""
# node.meta
DIMS = "fxprune.dims"  # the atoms of each dimension of the node's value (PropagateDimensionsPass)
VALUES = "fxprune.values"  # an integer tensor's values are positions of a dimension (value_rules)
PIECES = "fxprune.pieces"  # a split into single positions, and the cat that puts the pieces back
READ_AS = "fxprune.read_as"  # on a get_attr: the name the original graph read it under (tied weights)
WEIGHT_OF = "fxprune.weight_of"  # on a lifted linear call: the name the original graph read its weight under

# GraphModule.meta
PLAN_KEY = "fxprune.plan"  # the PrunePlan the graph was emitted for
BASE_KEY = "fxprune.base"  # the dense model's class and config, which save() needs to rebuild it
