"""Small torch.fx helpers that the passes, the analysis and the rewrite all need, written once."""
from __future__ import annotations

import torch


def get_attr_path(root: torch.nn.Module, path: str):
    """The attribute at dotted `path` below `root` (a parameter, buffer, constant or submodule)."""
    value = root
    for part in path.split("."):
        value = getattr(value, part)
    return value


def set_attr_path(root: torch.nn.Module, path: str, value, persistent: bool = True) -> None:
    """Put `value` at dotted `path`, creating empty modules on the way: a Parameter is registered as a
    parameter, a Module as a submodule, anything else as a buffer (`persistent` or not)."""
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(leaf, value)
    elif isinstance(value, torch.nn.Module):
        mod.add_module(leaf, value)
    else:
        mod.register_buffer(leaf, value, persistent=persistent)


def owner_and_leaf(root: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    """The module holding the attribute at dotted `path`, and the attribute's own name."""
    parent, _, leaf = path.rpartition(".")
    return (root.get_submodule(parent) if parent else root), leaf


def schema_arg(node: torch.fx.Node, name: str, default=None):
    """An op argument by its schema name, passed positionally or by keyword, else the schema's default
    (or `default` when the schema has none, or the target is no ATen overload)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.kwargs.get(name, default)
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if not a.kwarg_only and i < len(node.args):
                return node.args[i]
            return node.kwargs.get(name, a.default_value if a.has_default_value() else default)
    return default


def flat_dims(dims) -> list:
    """The atoms of a node's dimension labels: one list for a tensor, a list of lists for an op that
    returns several tensors (None entries for non-tensor outputs or dims are dropped)."""
    if not dims:
        return []
    if isinstance(dims[0], list) or dims[0] is None and any(isinstance(d, list) for d in dims):
        return [a for d in dims if d for a in d if a is not None]
    return [a for a in dims if a is not None]


def is_multi(dims) -> bool:
    """Whether dimension labels are those of several outputs (a list of lists)."""
    return bool(dims) and any(isinstance(d, list) for d in dims)


def packet(node: torch.fx.Node):
    """The op overload packet of a call (aten.view for aten.view.default), or None."""
    return getattr(node.target, "overloadpacket", None)
