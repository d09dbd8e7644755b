"""Atoms: the index spaces that tensor dimensions are made of.

Every tensor dimension in the graph is labelled with one atom. Atoms are united
(union-find) when two dimensions must be pruned together with the same index map.
A reshape that splits a dimension refines its atom into a *product* of smaller atoms
(row-major: heads x head_dim); a slice, split or concatenation refines it into a *sum*
of segments (q | k | v). A leaf atom that is not frozen is one prunable unit space:
removing index i of a leaf removes, in every dimension that contains it, exactly the
positions whose mixed-radix digit for that leaf is i.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import sympy
import torch

PROD, SUM = "prod", "sum"


class AtomConflict(Exception):
    """Two dimensions were asked to be equal but their structures cannot be reconciled."""


@dataclass(eq=False)
class Atom:
    """One dimension factor in the union-find of dimension propagation: its `size` (an int or a symbolic
    expression), where it came from (`origin`), its representative (`parent`), the unit `kind` a group gives it, and
    whether an op froze it (`frozen`, `frozen_by`) or needs `min_keep` positions."""
    id: int
    size: sympy.Expr
    origin: str = ""
    parent: "Atom | None" = None
    kind: str | None = None
    children: list = field(default_factory=list)
    frozen: bool = False
    frozen_by: str = ""
    broadcast: bool = False  # born where a size-1 dimension was expanded (e.g. query heads per KV group)
    min_keep: int = 1        # positions that must survive (top-k over this dimension needs k)

    @property
    def static(self) -> bool:
        """True when the size is a number, not a symbol (batch, sequence): only static atoms can be pruned."""
        return self.size.is_number

    def __repr__(self) -> str:
        return f"Atom#{self.id}({self.size}{',' + self.kind if self.kind else ''})"


def as_expr(size) -> sympy.Expr:
    """`size` (an int, a `torch.SymInt` or a sympy expression) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    if isinstance(size, sympy.Basic):
        return size
    return sympy.Integer(int(size))


def same_size(a: sympy.Expr, b: sympy.Expr) -> bool:
    """True when the two size expressions are equal, symbolically if need be."""
    return a == b or sympy.simplify(a - b) == 0


class AtomTable:
    """The atoms of one graph: creates them (`new`), unifies the ones ops tie together (`unify`), splits them into
    factors and segments, and freezes the ones an op cannot prune (`freeze`)."""
    def __init__(self):
        self.atoms: list[Atom] = []

    def new(self, size, origin: str = "", *, broadcast: bool = False) -> Atom:
        """A fresh root atom of `size`; `broadcast` marks one born where a size-1 dimension was expanded."""
        # Symbolic sizes (batch, sequence) are never pruned, but that is a property of the leaf
        # (see `static`), not a freeze: a refinement of 4*batch into (batch, 4) leaves the 4 free.
        atom = Atom(len(self.atoms), as_expr(size), origin, broadcast=broadcast)
        self.atoms.append(atom)
        return atom

    def find(self, a: Atom) -> Atom:
        """The representative of `a`'s class (with path compression)."""
        root = a
        while root.parent is not None:
            root = root.parent
        while a.parent is not None:
            a.parent, a = root, a.parent
        return root

    def freeze(self, a: Atom, why: str) -> None:
        """Mark `a`'s class unprunable, recording `why` (the op that could not follow it) for the frozen-op report."""
        a = self.find(a)
        if not a.frozen:
            a.frozen, a.frozen_by = True, why

    def require(self, a: Atom, n: int) -> None:
        """At least `n` positions of `a` must survive pruning."""
        a = self.find(a)
        a.min_keep = max(a.min_keep, int(n))

    # -- structure -----------------------------------------------------------
    def factors(self, a: Atom) -> list[Atom]:
        """Innermost-last list of product factors, nested products flattened, size-1 dropped."""
        a = self.find(a)
        if a.kind != PROD:
            return [] if a.size == 1 else [a]
        return [f for c in a.children for f in self.factors(c)]

    def segments(self, a: Atom) -> list[Atom]:
        """Left-to-right segments, nested sums flattened, empty segments dropped."""
        a = self.find(a)
        if a.kind != SUM:
            return [] if a.size == 0 else [a]
        return [s for c in a.children for s in self.segments(c)]

    def leaves(self, a: Atom) -> list[Atom]:
        """All leaf atoms a dimension is built from (with repetition)."""
        a = self.find(a)
        if a.kind is None:
            return [a]
        return [leaf for c in a.children for leaf in self.leaves(c)]

    def _refine(self, a: Atom, kind: str, sizes) -> list[Atom]:
        parts = [self.new(s, f"{kind} part of #{a.id}") for s in sizes]
        shell = self.new(a.size, a.origin)
        shell.kind, shell.children = kind, parts
        self.unify(a, shell)
        return parts

    def split_prod(self, a: Atom, sizes) -> list[Atom]:
        """Refine `a` so that it is the row-major product of atoms of `sizes`."""
        return self._refine(a, PROD, sizes)

    def split_sum(self, a: Atom, sizes) -> list[Atom]:
        """Refine `a` so that it is the concatenation of atoms of `sizes`."""
        return self._refine(a, SUM, sizes)

    def make(self, kind: str, parts: list[Atom], origin: str) -> Atom:
        """A new atom whose structure is `parts` (used when dimensions merge)."""
        parts = [self.find(p) for p in parts]
        if len(parts) == 1:
            return parts[0]
        size = sympy.Integer(0 if kind == SUM else 1)
        for p in parts:
            size = size + p.size if kind == SUM else size * p.size
        atom = self.new(sympy.simplify(size), origin)
        atom.kind, atom.children = kind, parts
        return atom

    # -- unification ---------------------------------------------------------
    def unify(self, a: Atom, b: Atom) -> Atom:
        """Join the classes of `a` and `b` (ops that tie two dimensions together) and return the representative."""
        a, b = self.find(a), self.find(b)
        if a is b:
            return a
        if not same_size(a.size, b.size):
            raise AtomConflict(f"sizes {a.size} and {b.size} differ")
        if a.kind is None and b.kind is not None:
            a, b = b, a
        if b.kind is None:  # b is a leaf: it simply takes a's identity and structure
            self._link(b, a)
            return a
        if a.kind != b.kind:
            raise AtomConflict(f"{a.kind} and {b.kind} structures of size {a.size}")
        fa = self.factors(a) if a.kind == PROD else self.segments(a)
        fb = self.factors(b) if b.kind == PROD else self.segments(b)
        self._link(b, a)
        if a.kind == PROD:
            self._align_products(fa, fb)
        else:
            self._align_sums(fa, fb)
        return self.find(a)

    def _link(self, child: Atom, root: Atom) -> None:
        child.parent = root
        if child.frozen and not root.frozen:
            root.frozen, root.frozen_by = True, child.frozen_by
        root.broadcast = root.broadcast or child.broadcast
        root.min_keep = max(root.min_keep, child.min_keep)

    def _align_products(self, fa: list[Atom], fb: list[Atom]) -> None:
        # Walk from the innermost factor outwards, splitting the larger factor when
        # the two factorisations disagree (e.g. (9, 64) against (3, 3, 64)).
        fa, fb = list(fa), list(fb)
        while fa and fb:
            x, y = self.find(fa.pop()), self.find(fb.pop())
            if same_size(x.size, y.size):
                self.unify(x, y)
                continue
            if not (x.static and y.static):
                # (batch, seq) against (batch*seq): merge the smaller side with its next outer
                # factor. Symbolic sizes are never pruned, so no structure is lost.
                num, den = sympy.fraction(sympy.simplify(x.size / y.size))
                grow, keep, rest = (fb, x, y) if den == 1 else (fa, y, x) if num == 1 else (None, None, None)
                if not grow:
                    raise AtomConflict("cannot align symbolic factors")
                merged = self.make(PROD, [self.find(grow.pop()), rest], "merged symbolic factors")
                grow.append(merged)
                (fa if keep is x else fb).append(keep)
                continue
            big, small, rest = (x, y, fa) if int(x.size) > int(y.size) else (y, x, fb)
            if int(big.size) % int(small.size):
                raise AtomConflict(f"factors {x.size} and {y.size} do not nest")
            if big.kind == SUM:
                raise AtomConflict("cannot split a concatenation as a product")
            outer, inner = self.split_prod(big, [int(big.size) // int(small.size), int(small.size)])
            self.unify(inner, small)
            rest.append(outer)
        if fa or fb:
            raise AtomConflict("products of different length")

    def _align_sums(self, sa: list[Atom], sb: list[Atom]) -> None:
        sa, sb = list(reversed(sa)), list(reversed(sb))
        while sa and sb:
            x, y = self.find(sa.pop()), self.find(sb.pop())
            if same_size(x.size, y.size):
                self.unify(x, y)
                continue
            if not (x.static and y.static):
                raise AtomConflict("cannot align symbolic segments")
            big, small, rest = (x, y, sa) if int(x.size) > int(y.size) else (y, x, sb)
            if big.kind == PROD:
                raise AtomConflict("cannot split a product as a concatenation")
            head, tail = self.split_sum(big, [int(small.size), int(big.size) - int(small.size)])
            self.unify(head, small)
            rest.append(tail)
        if sa or sb:
            raise AtomConflict("concatenations of different length")

    # -- after propagation ---------------------------------------------------
    def settle_frozen(self) -> None:
        """A frozen structured atom freezes every leaf it is built from; so does a minimum size on a
        structured atom (which of its leaves would have to keep how much is not tracked)."""
        for atom in self.atoms:
            root = self.find(atom)
            if root.min_keep > 1 and root.kind is not None and not root.frozen:
                root.frozen, root.frozen_by = True, f"at least {root.min_keep} positions must stay"
            if root.frozen and root.kind is not None:
                for leaf in self.leaves(root):
                    if not leaf.frozen:
                        leaf.frozen, leaf.frozen_by = True, root.frozen_by

    # -- index maps ----------------------------------------------------------
    def kept_size(self, a: Atom, kept: dict[int, int]):
        """Size of a dimension after pruning; `kept` maps leaf id -> kept count."""
        a = self.find(a)
        if a.kind is None:
            return sympy.Integer(kept[a.id]) if a.id in kept else a.size
        sizes = [self.kept_size(c, kept) for c in a.children]
        out = sympy.Integer(0 if a.kind == SUM else 1)
        for s in sizes:
            out = out + s if a.kind == SUM else out * s
        return sympy.simplify(out)

    def kept_int(self, a: Atom, kept: dict[int, int]) -> int:
        """`kept_size` of a static dimension in plain integers (the planner calls it many thousand times)."""
        a = self.find(a)
        if a.kind is None:
            return kept[a.id] if a.id in kept else int(a.size)
        sizes = [self.kept_int(c, kept) for c in a.children]
        return sum(sizes) if a.kind == SUM else math.prod(sizes)

    def kept_index(self, a: Atom, kept: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """Positions of a static dimension that survive; None when nothing is removed."""
        a = self.find(a)
        if not any(leaf.id in kept for leaf in self.leaves(a)):
            return None
        if a.kind is None:
            return kept[a.id]
        parts = [self.kept_index(c, kept) for c in a.children]
        full = [torch.arange(int(self.find(c).size)) if p is None else p for c, p in zip(a.children, parts)]
        if a.kind == SUM:
            offsets = itertools.accumulate([0] + [int(self.find(c).size) for c in a.children[:-1]])
            return torch.cat([p + off for p, off in zip(full, offsets)])
        index = torch.zeros(1, dtype=torch.long)
        for child, p in zip(a.children, full):
            index = (index[:, None] * int(self.find(child).size) + p[None, :]).reshape(-1)
        return index

    def digit_map(self, a: Atom, leaf: Atom) -> torch.Tensor:
        """For each position of a static dimension, the index of `leaf` it belongs to (-1: none)."""
        a, leaf = self.find(a), self.find(leaf)
        size = int(a.size)
        if a is leaf:
            return torch.arange(size)
        if a.kind is None:
            return torch.full((size,), -1, dtype=torch.long)
        parts = [self.digit_map(c, leaf) for c in a.children]
        if a.kind == SUM:
            return torch.cat(parts)
        out = torch.full((1,), -1, dtype=torch.long)
        for p in parts:
            out = torch.maximum(out[:, None], p[None, :]).reshape(-1)
        return out
