"""The result of dependency analysis: groups of coupled dimensions, with their prunable units."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import torch

from fxprune.analysis.fx_util import flat_dims
from fxprune.analysis.pieces import unit_parameters
from fxprune.analysis.propagate_dimensions import Labels
from fxprune.analysis.meta_keys import DIMS

KINDS = ("heads", "kv_groups", "group_heads", "mlp", "hidden", "experts", "head_dim", "other")
SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}


@dataclass
class Member:
    """One dimension of one parameter or buffer coupled into a group: its canonical `name` in the original model,
    the `dim`, and `unit_of`, the unit each position along `dim` belongs to (-1: none)."""
    name: str            # canonical parameter or buffer name in the original model
    dim: int
    unit_of: torch.Tensor  # for each position along `dim`, the unit it belongs to (-1: none)

    @property
    def width(self) -> int:
        """Positions per unit along this dimension (head_dim for q rows, 1 for a channel)."""
        units = self.unit_of[self.unit_of >= 0]
        return units.numel() // max(1, int(units.unique().numel()))


@dataclass
class Group:
    """A set of dimensions that must be pruned together, unit by unit (a head, a KV group, an MLP channel, a hidden
    channel, an expert): its `kind`, `n_units`, `layer`, `members`, `params_per_unit`, the fewest units that must
    stay (`min_units`), the fx `nodes` it spans, and the ops that renormalise over its units (`renormalised_by`)."""
    id: int
    kind: str
    n_units: int
    layer: int | None
    members: list[Member]
    atom_id: int
    params_per_unit: int
    min_units: int = 1  # a top-k over the units needs k of them
    nodes: list = field(default_factory=list, repr=False)  # fx nodes whose dims contain the atom
    # Ops that take statistics over the units (a norm over all heads of a projection, RMSNorm over the
    # hidden channels): removing units changes what the kept ones see, so the pruned model is not the
    # original with those units zeroed; its proof is a smaller-config twin.
    renormalised_by: tuple = ()

    @property
    def renormalising(self) -> bool:
        """True when some op takes statistics over the units, so pruning is not the same as zeroing them."""
        return bool(self.renormalised_by)

    @property
    def unit_size(self) -> int:
        """Positions per unit in the narrowest member (head_dim for heads, 1 for channels)."""
        return min(m.width for m in self.members)

    @property
    def graph(self) -> nx.DiGraph:
        """The ops and tensors this group couples, with data edges between them."""
        g = nx.DiGraph()
        inside = set(self.nodes)
        for n in self.nodes:
            g.add_node(n.name, op=n.op, target=str(n.target))
            for src in n.all_input_nodes:
                if src in inside:
                    g.add_edge(src.name, n.name)
        return g

    def describe(self) -> str:
        """One summary line: id, kind, layer, units x size, parameters per unit, members and renormalising ops."""
        layer = "-" if self.layer is None else str(self.layer)
        return (f"g{self.id:<4} {self.kind:<11} layer {layer:>3}  units {self.n_units:>5} x {self.unit_size:<4} "
                f"params/unit {self.params_per_unit:>7}  members {len(self.members)}"
                + (f"  renormalising ({', '.join(self.renormalised_by[:3])})" if self.renormalising else ""))


class DependencyGraph:
    """Groups of dimensions that must be pruned together, found on a captured graph.

    Every attribute is set here: `gm` (the captured GraphModule), `labels`/`table` (the dimension
    propagation's result), `frozen_ops`, `parameters`/`buffers`/`aliases` (canonical tensors by name,
    tied names -> canonical), `order` (node -> position), `attention_ops` ((op, query dims, key dims)
    per attention, in graph order: one per layer), `groups`, and what the capture came from:
    `exported` (the ExportedProgram, or None), `model` (the analysed module, or None) and
    `model_config` (its Hugging Face config, or None).
    """

    def __init__(self, gm: torch.fx.GraphModule, labels: Labels, *, exported=None, model=None):
        self.gm, self.labels, self.table = gm, labels, labels.table
        self.exported, self.model = exported, model
        self.model_config = getattr(model, "config", None)
        self.frozen_ops = list(labels.frozen_ops)
        self.parameters, self.buffers, self.aliases = self._tensors()
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.attention_ops = self._attention_ops()
        # dims split into single positions, with the parameters of each position (fxprune.analysis.pieces)
        self.unit_parameters = unit_parameters(labels, self.aliases, self.parameters)
        self._unit_owned = {n for p in self.unit_parameters for names in p.names for n in names}
        self.groups = self._build_groups()

    # -- tensors ---------------------------------------------------------------
    def _tensors(self):
        params, buffers, aliases, seen = {}, {}, {}, {}
        for kind, items in (("p", self.gm.named_parameters(remove_duplicate=False)),
                            ("b", self.gm.named_buffers(remove_duplicate=False))):
            for name, t in items:
                if id(t) in seen:
                    aliases[name] = seen[id(t)]
                    continue
                seen[id(t)] = name
                (params if kind == "p" else buffers)[name] = t
        return params, buffers, aliases

    def dims_of(self, name):
        """The atoms labelling each dimension of the parameter or buffer `name`, or None when it has no labels."""
        t = self.parameters.get(name, self.buffers.get(name))
        return self.labels.tensor_atoms.get(id(t))

    def num_parameters(self) -> int:
        """Number of parameters of the analysed model (each tensor counted once)."""
        return sum(t.numel() for t in self.parameters.values())

    def count_parameters(self, kept_counts: dict[int, int]) -> int:
        """Unique parameters after keeping `kept_counts[atom_id]` units of each listed atom."""
        total = 0
        for pieces in self.unit_parameters:  # positions alike: each kept position keeps its own
            kept = self.table.kept_int(pieces.atom, kept_counts)
            total += kept * sum(self._count(n, kept_counts) for n in pieces.names[0])
        for name, t in self.parameters.items():
            if name not in self._unit_owned:
                total += self._count(name, kept_counts)
        return total

    def _count(self, name: str, kept_counts: dict[int, int]) -> int:
        t = self.parameters[name]
        dims = self.dims_of(name)
        return t.numel() if dims is None else math.prod(self.table.kept_int(a, kept_counts) for a in dims)

    # -- groups ----------------------------------------------------------------
    def _build_groups(self):
        T = self.table
        occurrences: dict[int, list] = {}
        for name in list(self.parameters) + list(self.buffers):
            dims = self.dims_of(name)
            for d, atom in enumerate(dims or []):
                for leaf in {l.id: l for l in T.leaves(atom)}.values():
                    if not leaf.frozen and leaf.static and int(leaf.size) > 1:
                        occurrences.setdefault(leaf.id, []).append((name, d, atom))
        kinds, layers = self._classify()
        groups = []
        for atom_id, occ in sorted(occurrences.items(), key=lambda kv: self._first_use(kv[1])):
            leaf = T.atoms[atom_id]
            members = [Member(name, d, T.digit_map(atom, leaf)) for name, d, atom in occ]
            members += self._piece_members(leaf)
            if not any(m.name in self.parameters for m in members):
                continue
            before = self.num_parameters()
            after = self.count_parameters({atom_id: int(leaf.size) - 1})
            kind = kinds.get(atom_id) or self._channel_kind(members, occ, kinds)
            layer = None if kind == "hidden" else layers.get(atom_id, self._layer_of(occ))
            groups.append(Group(len(groups), kind, int(leaf.size), layer, members, atom_id, before - after,
                                min(T.find(leaf).min_keep, int(leaf.size))))
        renormalised_by = {}
        for atom, node_name in self.labels.renormalising:
            for leaf in T.leaves(atom):
                renormalised_by.setdefault(leaf.id, []).append(node_name)
        for g in groups:
            g.nodes = self._nodes_with(g.atom_id)
            g.renormalised_by = tuple(dict.fromkeys(renormalised_by.get(g.atom_id, ())))
        return groups

    def _piece_members(self, leaf) -> list[Member]:
        """The parameters of the positions of split dims that `leaf` is part of: all of a position's
        parameters belong to the unit of `leaf` that the position has."""
        members = []
        for pieces in self.unit_parameters:
            if leaf.id not in {l.id for l in self.table.leaves(pieces.atom)}:
                continue
            units = pieces.unit_of_positions(self.table, leaf)
            members += [Member(n, 0, torch.full((self.parameters[n].shape[0],), int(units[i])))
                        for i, names in enumerate(pieces.names) for n in names]
        return members

    def _uses(self, occ):
        names = {name for name, _, _ in occ}
        return [self.order[u] for n in self.gm.graph.nodes
                if n.op == "get_attr" and self.aliases.get(n.target, n.target) in names for u in n.users]

    def _first_use(self, occ):
        return min(self._uses(occ), default=len(self.order))

    def _attention_ops(self):
        """(op, query dims, key dims) for sdpa and for matmul -> ... -> softmax -> matmul chains."""
        found = list(self.labels.attention)
        for node in self.gm.graph.nodes:
            name = getattr(node.target, "__name__", "")
            if node.op != "call_function" or name.split(".")[0] not in SOFTMAX:
                continue
            qk = self._producer_matmul(node)
            if qk is not None:
                a, b = (qk.args[1], qk.args[2]) if len(qk.args) > 2 else (qk.args[0], qk.args[1])
                found.append((qk, a.meta[DIMS], b.meta[DIMS]))
        return sorted(found, key=lambda t: self.order[t[0]])

    def _producer_matmul(self, node, depth=8):
        frontier = [node]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for src in n.all_input_nodes:
                    if src in self.labels.matmuls:
                        return src
                    nxt.append(src)
            frontier = nxt
        return None

    def _classify(self):
        T = self.table
        kinds, layers = {}, {}
        for layer, (_, dq, _) in enumerate(self.attention_ops):
            for atom in dq[:-2]:
                leaves = [l for l in T.leaves(atom) if l.static and int(l.size) > 1]
                # KV groups x query heads per group; with one KV head (MQA) the query heads are plain heads
                grouped = any(l.broadcast for l in leaves) and not all(l.broadcast for l in leaves)
                for leaf in leaves:
                    kinds.setdefault(leaf.id, ("group_heads" if leaf.broadcast else "kv_groups") if grouped else "heads")
                    layers.setdefault(leaf.id, layer)
            for leaf in T.leaves(dq[-1]):
                kinds.setdefault(leaf.id, "head_dim")
                # rotary frequencies shared by every layer belong to no single layer
                layers[leaf.id] = layer if layers.get(leaf.id, layer) == layer else None
        for atom in self.labels.experts:
            for leaf in T.leaves(atom):
                kinds.setdefault(leaf.id, "experts")
        for atom in self.labels.embeddings:
            for leaf in T.leaves(atom):
                kinds.setdefault(leaf.id, "hidden")
        return kinds, layers

    def _channel_kind(self, members, occ, kinds):
        # Beside a head in one dimension (value rows: heads x head_dim): it is a head's inner dimension.
        T = self.table
        head_kinds = ("heads", "kv_groups", "group_heads")
        if any(kinds.get(l.id) in head_kinds for _, _, atom in occ for l in T.leaves(atom)):
            return "head_dim"
        # An intermediate channel space: produced by one projection (rows) and read by another (columns).
        mats = [m for m in members if m.name in self.parameters and self.parameters[m.name].dim() >= 2]
        rows = any(m.dim == self.parameters[m.name].dim() - 2 for m in mats)
        cols = any(m.dim == self.parameters[m.name].dim() - 1 for m in mats)
        return "mlp" if rows and cols else "other"

    def _layer_of(self, occ):
        # The layer is that of the last attention op before the group's last use (o_proj, down_proj).
        pos = max(self._uses(occ), default=0)
        starts = [self.order[op] for op, _, _ in self.attention_ops]
        before = sum(1 for s in starts if s < pos)
        return max(before - 1, 0) if starts else None

    def _nodes_with(self, atom_id):
        T = self.table
        out = []
        for node in self.gm.graph.nodes:
            if any(leaf.id == atom_id for a in flat_dims(node.meta.get(DIMS)) for leaf in T.leaves(a)):
                out.append(node)
        return out

    # -- views -------------------------------------------------------------------
    def by_kind(self, *kinds):
        """The groups whose kind is one of `kinds`."""
        return [g for g in self.groups if g.kind in kinds]

    def summary(self) -> str:
        """A text table: group count, counts per kind, then one `Group.describe` line per group."""
        lines = [f"{len(self.groups)} groups over {self.num_parameters():,} parameters"]
        counts = {k: len(self.by_kind(k)) for k in KINDS if self.by_kind(k)}
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        lines += [g.describe() for g in self.groups]
        if self.frozen_ops:
            lines.append(f"frozen by {len(self.frozen_ops)} ops without a rule or with irreconcilable shapes:")
            lines += [f"  {n} ({op}): {why}" for n, op, why in self.frozen_ops]
        return "\n".join(lines)

    __str__ = summary

    def to_networkx(self) -> nx.Graph:
        """Bipartite graph: group nodes ('g3') linked to the parameter dimensions they cover."""
        g = nx.Graph()
        for grp in self.groups:
            g.add_node(f"g{grp.id}", kind=grp.kind, units=grp.n_units, layer=grp.layer, bipartite=0)
            for m in grp.members:
                g.add_node(f"{m.name}:{m.dim}", bipartite=1)
                g.add_edge(f"g{grp.id}", f"{m.name}:{m.dim}", width=m.width)
        return g

    def to_dot(self, groups=None) -> str:
        """Graphviz source of `groups` (default all) and the parameters they couple."""
        groups = self.groups if groups is None else groups
        lines = ["graph fxprune {", "  rankdir=LR; node [fontsize=10];"]
        for grp in groups:
            lines.append(f'  g{grp.id} [shape=box, label="g{grp.id} {grp.kind}\\n{grp.n_units} x {grp.unit_size}"];')
            for m in grp.members:
                lines.append(f'  "{m.name}:{m.dim}" [shape=ellipse];')
                lines.append(f'  g{grp.id} -- "{m.name}:{m.dim}";')
        lines.append("}")
        return "\n".join(lines)

    def draw(self, path, layer: int | None = 0, groups=None) -> None:
        """Picture (PNG or SVG by extension): groups on the left, the parameter dimensions they
        cover on the right. For a layer, the hidden group is shown through that layer's tensors only."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        colors = {"heads": "#e4572e", "kv_groups": "#f3a712", "group_heads": "#ffd166", "mlp": "#5c7aaf",
                  "hidden": "#669bbc", "experts": "#9b5de5", "head_dim": "#a8c686", "other": "#999999"}
        if groups is None:
            groups = [g for g in self.groups if layer is None or g.layer == layer]
        names = {m.name for g in groups for m in g.members}
        shown = list(groups) + [g for g in self.by_kind("hidden") if g not in groups and layer is not None]
        edges, right = [], []
        for g in shown:
            for m in g.members:
                if g.kind == "hidden" and layer is not None and m.name not in names:
                    continue
                key = f"{m.name} [dim {m.dim}]"
                if key not in right:
                    right.append(key)
                edges.append((g, key))
        fig, ax = plt.subplots(figsize=(12, 0.45 * max(len(right), len(shown)) + 1.5))
        ys = {k: -i for i, k in enumerate(right)}
        gy = {g.id: -i * max(len(right) / max(len(shown), 1), 1) for i, g in enumerate(shown)}
        for g, key in edges:
            ax.plot([0, 1], [gy[g.id], ys[key]], color=colors[g.kind], lw=1.2, alpha=0.7)
        for g in shown:
            ax.text(0, gy[g.id], f"g{g.id} {g.kind}\n{g.n_units} units x {g.unit_size}", ha="right", va="center",
                    fontsize=9, bbox=dict(boxstyle="round", fc=colors[g.kind], ec="none", alpha=0.9))
        for key, y in ys.items():
            ax.text(1.01, y, key, ha="left", va="center", fontsize=8)
        ax.set_xlim(-0.6, 2.2)
        ax.axis("off")
        ax.set_title(f"fxprune groups{'' if layer is None else f' of layer {layer}'} (lines: group -> tensor dimension it prunes)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
