"""When a graph may be padded: how each node's real rows depend on input rows along the token dim.

Padding appends rows at the end of the token dim, so a padded graph is right
exactly when every real output row (rows below the real count n, on every
token dim) reads real input rows alone, and every output without a token dim
reads real rows alone. Each node is classified by how its rows depend on its
inputs' rows:

* row-wise: row i reads row i (pointwise ops, linears, norms over features,
  views that keep the token dim whole, embeddings);
* causal: row i reads rows <= i (`cumsum`, `diff` with `prepend`, the first
  row, a slice that starts at a fixed row, an identity gather by `arange`);
* anything else: reads later rows or the count itself (`flip`, `sort`, a
  reduction over the token dim, a row picked from the end, an index computed
  from data, the token count used as a number). Such a node *taints* its
  value, and taint flows to every node that reads it.

Two kinds of tainted node are rewritten instead (`rewrite/row_rewrites.py`), so that
the graph stays paddable: a row picked from the end (`x[:, -1]`, `x[:, -k:]`,
`narrow`/`select` with an end-relative start, HF's `logits_to_keep`) becomes a
gather at the real rows n-k..n-1, and the token count used as a value in a
pointwise op reads the real count from the device. What cannot be rewritten
keeps the graph at exact sizes, and the first tainted node that reaches an
output, a split op or an in-place write gives the reason.

An op this module does not know is treated as "anything else" when it touches
a token dim: an unknown op never makes a graph padded.

Some modules map each token's row to its own output row however they compute
it inside. An MoE block sorts the tokens by expert, counts them and runs
grouped GEMMs, all across the token dim, yet with per-token top-k routing and
no capacity limit a padded token can never change a real token's experts or
result. Nodes inside a module whose class is registered as row-wise
(`register_row_wise`; HF's Granite and NemotronH MoE blocks by
default) are not tainted by what they do inside; taint that enters the module
still flows through it.
"""

from __future__ import annotations

import dataclasses
import operator

import sympy
import torch
import torch.fx

from .fx_facts import DATA_FREE, VIEW_NAMES, node_value, target_name, tensors_in, written_args
from ..ops.registry import split_op_name


@dataclasses.dataclass
class Pick:
    """Rows picked from the end of the token dim: rewritten as a gather at real rows `start(n) ..`."""

    node: torch.fx.Node
    source: torch.fx.Node     # the tensor the rows are picked from
    dim: int                  # its token dim
    start: sympy.Expr         # the first row picked, in terms of the token symbol
    length: int               # how many rows (static)
    keep_dim: bool            # False for an integer index: the dim is dropped
    position: int | None      # for getitem: which component of the (normalized) index tuple


@dataclasses.dataclass
class CountUse:
    """The token count used as a value: argument `position` of `node` is rewritten to read the device count."""

    node: torch.fx.Node
    position: int | str       # an index into args, or a kwarg name
    expr: sympy.Expr


@dataclasses.dataclass
class PaddingPlan:
    """The verdict for one graph: None for `reason` means paddable, after the rewrites listed."""

    reason: str | None
    picks: list[Pick]
    counts: list[CountUse]
    row_wise_modules: list[str] = dataclasses.field(default_factory=list)   # trusted as row-wise (see above)

    @property
    def rewrites(self) -> int:
        return len(self.picks) + len(self.counts)


# Classes (by name) whose forward maps each token row to its own output row: MoE blocks with
# per-token top-k routing and no capacity limit.
ROW_WISE_MODULES: set[str] = {"GraniteMoeHybridMoE", "NemotronHMoE"}
# Custom ops (by "ns::name") declared row-wise by their authors; pcg's router and experts ops route each token alone.
ROW_WISE_OPS: set[str] = {"pcg::moe_experts", "pcg::moe_router"}


def register_row_wise(target) -> None:
    """Declare that an op, or a module class's forward, computes each output row from its own input row alone.

    `target` is a module class, or a torch custom op (OpOverload,
    OpOverloadPacket or "ns::name"). An op pcg does not know otherwise keeps
    its graph at exact sizes. Only true declarations keep padding sound: an MoE
    with a capacity limit (tokens dropped when an expert is full) is not
    row-wise, since padded tokens could take a real token's place.
    """
    if isinstance(target, type):
        ROW_WISE_MODULES.add(target.__name__)
    elif isinstance(target, str) and "::" in target:
        ROW_WISE_OPS.add(target.split(".")[0])
    elif isinstance(target, torch._ops.OpOverload):
        ROW_WISE_OPS.add(target._schema.name)
    elif isinstance(target, torch._ops.OpOverloadPacket):
        ROW_WISE_OPS.add(target._qualified_op_name)
    else:
        raise ValueError(f"register_row_wise takes a module class or a torch custom op, got {target!r}")


def _op_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def _row_wise_module(node) -> str | None:
    """The path of the innermost registered row-wise module a node was traced in, if any."""
    for path, cls in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        if getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>")) in ROW_WISE_MODULES:
            return f"{path} ({getattr(cls, '__name__', cls)})"
    return None


_OPERATOR_POINTWISE = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.invert, operator.and_, operator.or_, operator.xor,
    operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne, operator.lshift, operator.rshift,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior,
}
# Row-wise by definition, though not tagged pointwise in aten (casts, copies, masks by position).
_POINTWISE_NAMES = {
    "to", "type", "type_as", "float", "half", "bfloat16", "double", "int", "long", "bool", "short", "byte", "char",
    "contiguous", "clone", "detach", "dropout", "alias", "tril", "triu", "masked_fill", "masked_fill_", "one_hot",
    "clamp_min", "clamp_max", "softplus", "gelu", "silu", "mish", "hardswish", "copy_", "fill_", "zero_",
}
_PERMUTES = {"unsqueeze", "squeeze", "permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims",
             "expand", "expand_as"}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_unsafe_view"}
_SPLITS = {"split", "chunk", "unbind", "split_with_sizes", "tensor_split"}
_SCANS = {"cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "cumsum_"}
# reduction name -> (positional index of its dim argument, default when absent: None = every dim)
_REDUCTIONS = {
    "sum": (1, None), "mean": (1, None), "amax": (1, None), "amin": (1, None), "prod": (1, None),
    "var": (1, None), "std": (1, None), "var_mean": (1, None), "std_mean": (1, None), "norm": (2, None),
    "logsumexp": (1, None), "argmax": (1, None), "argmin": (1, None), "all": (1, None), "any": (1, None),
    "count_nonzero": (1, None), "nansum": (1, None), "nanmean": (1, None), "median": (1, None),
    "mode": (1, -1), "softmax": (1, None), "log_softmax": (1, None), "sort": (1, -1), "argsort": (1, -1),
    "topk": (2, -1), "kthvalue": (2, -1), "max": (1, None), "min": (1, None), "normalize": (2, 1),
    "aminmax": (1, None),
}
_ALLOCATIONS = {"empty", "zeros", "ones", "empty_like", "zeros_like", "ones_like", "new_empty", "new_zeros",
                "new_ones", "empty_strided", "new_empty_strided", "rand", "randn", "rand_like", "randn_like",
                "randint", "randint_like", "eye"}
_FILLS = {"full": 1, "new_full": 1, "full_like": 1}
_MATMULS = {"matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "__matmul__"}
_CATS = {"cat", "concat", "concatenate"}


def _aten_pointwise(name: str) -> bool:
    packet = getattr(torch.ops.aten, name, None)
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return False
    return any(torch.Tag.pointwise in getattr(packet, o).tags for o in packet.overloads())


_POINTWISE_CACHE: dict[str, bool] = {}


def is_pointwise(node: torch.fx.Node) -> bool:
    """Each output element reads the input elements at its own position (with broadcasting)."""
    if node.op == "call_function" and node.target in _OPERATOR_POINTWISE:
        return True
    name = target_name(node)
    if name in _POINTWISE_NAMES:
        return True
    if name in ("max", "min"):   # max(a, b) is pointwise; max(a, dim) a reduction
        return len(node.args) > 1 and isinstance(node_value(node.args[1]), torch.Tensor)
    if name not in _POINTWISE_CACHE:
        # `add_` is as row-wise as `add`; dunders such as `__and__` are looked up as they are.
        in_place = name.endswith("_") and not name.endswith("__")
        _POINTWISE_CACHE[name] = _aten_pointwise(name) or (in_place and _aten_pointwise(name[:-1]))
    return _POINTWISE_CACHE[name]


# Casts and position masks among the row-wise names take ints that must stay Python numbers.
_SCALAR_VALUE_NAMES = {"masked_fill", "masked_fill_", "clamp_min", "clamp_max", "fill_"}


def _takes_tensor_values(node, name: str) -> bool:
    """Whether a number argument of this pointwise op may be a 0-dim device tensor instead (arithmetic, compares)."""
    if node.op == "call_function" and node.target in _OPERATOR_POINTWISE:
        return True
    if name in _SCALAR_VALUE_NAMES:
        return True
    return name not in _POINTWISE_NAMES


def _arg(node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Tainted(Exception):
    """A node reads rows that padding changes; carries the reason."""


class _Analysis:
    def __init__(self, gm: torch.fx.GraphModule, token, aliases, keyed):
        self.gm = gm
        self.token = token
        self.subs = {a: token for a in aliases}
        self.foreign_ok = set(keyed) | {token, *aliases}
        self.taint: dict[torch.fx.Node, str] = {}
        self.iota: dict[torch.fx.Node, int] = {}   # value == index along this dim (an `arange` of the count)
        self.picks: list[Pick] = []
        self.counts: list[CountUse] = []
        self.reason: str | None = None
        self.row_wise: dict[str, None] = {}   # registered row-wise modules whose inside read across tokens

    # --- sizes -------------------------------------------------------------------------------------------------
    def expr(self, size) -> sympy.Expr:
        if isinstance(size, (torch.SymInt, torch.SymFloat)):
            return sympy.sympify(size.node.expr).xreplace(self.subs)
        return sympy.sympify(size)

    def has_token(self, size) -> bool:
        return self.token in self.expr(size).free_symbols

    def token_dims(self, value) -> list[int]:
        if not isinstance(value, torch.Tensor):
            return []
        return [d for d, size in enumerate(value.shape) if self.has_token(size)]

    def check_form(self, node, value) -> None:
        """A token dim must be the count plus a constant: its real rows are then a prefix the runtime can slice."""
        for t in tensors_in(value):
            for size in t.shape:
                e = self.expr(size)
                if self.token in e.free_symbols and not (e - self.token).is_Integer:
                    raise _Tainted(f"{node.name} has a dim of size {e}, not the token count plus a constant, so its "
                                   f"real rows are not a prefix")

    def hint(self, size) -> int | None:
        if isinstance(size, torch.SymInt):
            return size.node.hint if size.node.has_hint() else None
        return int(size) if isinstance(size, int) else None

    # --- the walk ------------------------------------------------------------------------------------------------
    def run(self) -> PaddingPlan:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                try:
                    self.check_form(node, node_value(node))
                except _Tainted as e:
                    self.sink(node, str(e), f"graph input {node.name}")
                continue
            if node.op == "output":
                for arg in node.all_input_nodes:
                    if arg in self.taint:
                        self.sink(arg, self.taint[arg], "a graph output")
                continue
            inherited = next((self.taint[a] for a in node.all_input_nodes if a in self.taint), None)
            name = target_name(node)
            if inherited is not None and name not in DATA_FREE:
                self.taint[node] = inherited
            else:
                try:
                    self.visit(node, name)
                except _Tainted as e:
                    module = _row_wise_module(node)
                    if module is None:
                        self.taint[node] = str(e)
                    else:
                        self.row_wise[module] = None
            if node in self.taint and (split_op_name(node.target) or written_args(node)):
                self.sink(node, self.taint[node], "a split op" if split_op_name(node.target) else "an in-place write")
        if self.reason:
            return PaddingPlan(self.reason, [], [])
        return PaddingPlan(None, self.picks, self.counts, list(self.row_wise))

    def sink(self, node, reason: str, where: str) -> None:
        if self.reason is None:
            self.reason = f"{reason}; it reaches {where}, so padded rows could change a real result"

    def visit(self, node: torch.fx.Node, name: str) -> None:
        value = node_value(node)
        if not any(True for _ in tensors_in(value)):
            return   # host values (sizes, arithmetic on them): a size of the count is fine as a shape
        self.check_form(node, value)
        self.meets_other_sizes(node)
        if split_op_name(node.target):
            return   # split ops read real rows only: they slice to n or read the device count
        if node.op == "call_function" and node.target is operator.getitem and not isinstance(
                node_value(node.args[0]), torch.Tensor):
            return   # an element of a tuple (split, max(dim), ...)
        custom = _op_name(node.target)
        if custom is not None and not custom.startswith("aten::"):
            # A custom op is known only by its declaration, never by a name it shares with a torch op.
            if custom not in ROW_WISE_OPS:
                self.unknown(node, custom)
        elif is_pointwise(node):
            self.pointwise(node, name)
        elif name in _PERMUTES:
            self.permute(node, name)
        elif name in _RESHAPES:
            self.reshape(node)
        elif name in _SPLITS:
            self.split(node)
        elif name in _SCANS:
            pass    # causal along the scanned dim, row-wise along the others
        elif name == "diff":
            self.diff(node)
        elif name in _REDUCTIONS:
            self.reduction(node, name)
        elif name in ("layer_norm", "rms_norm", "group_norm"):
            self.norm(node, name)
        elif name == "linear":
            if self.token_dims(node_value(node.args[0]))[-1:] == [node_value(node.args[0]).dim() - 1]:
                raise _Tainted(f"{node.name}: a linear layer contracts over the token dim")
            self.no_token_in(node, node.args[1:], "weights")
        elif name in _MATMULS or node.target is operator.matmul:
            self.matmul(node)
        elif name == "einsum":
            self.einsum(node)
        elif name == "getitem":
            self.getitem(node)
        elif name in ("narrow", "select"):
            self.narrow_or_select(node, name)
        elif name in ("index_select", "gather"):
            self.gather(node, name)
        elif name == "embedding":
            self.no_token_in(node, node.args[1:2], "the embedding table")
        elif name in _CATS:
            self.cat(node)
        elif name == "stack":
            pass    # a new dim: row-wise along every old one
        elif name in _ALLOCATIONS:
            pass    # shapes only: a token dim of an allocation is padded like any other
        elif name in _FILLS:
            self.count_fill(node, _FILLS[name])
        elif name == "arange":
            self.arange(node)
        elif name == "scaled_dot_product_attention":
            self.sdpa(node)
        else:
            self.unknown(node, name)

    # --- rules -----------------------------------------------------------------------------------------------------
    def meets_other_sizes(self, node) -> None:
        """The token count meeting a size that padding leaves alone (a mask over a longer KV length).

        Padded rows would meet unpadded ones: an `arange` over the bucket would index past the
        other tensor's end, so such a node never runs padded.
        """
        if split_op_name(node.target):
            return
        syms = set()
        for v in (node_value(node), *(node_value(a) for a in node.all_input_nodes)):
            for t in tensors_in(v):
                for size in t.shape:
                    syms |= self.expr(size).free_symbols
        if self.token in syms and syms - self.foreign_ok:
            others = ", ".join(sorted(str(s) for s in syms - self.foreign_ok))
            raise _Tainted(f"{node.name}: the token count meets another dynamic size ({others}) that padding "
                           f"leaves alone, such as a mask's KV length")

    def touches_tokens(self, node) -> bool:
        values = [node_value(node), *(node_value(a) for a in node.all_input_nodes)]
        return any(self.token_dims(t) for v in values for t in tensors_in(v)) or any(
            self.has_token(v) for v in values if isinstance(v, (torch.SymInt, torch.SymFloat)))

    def unknown(self, node, name) -> None:
        if self.touches_tokens(node):
            raise _Tainted(f"{node.name}: {name} is not known to keep rows apart along the token dim")

    def no_token_in(self, node, args, what: str) -> None:
        for a in args:
            if isinstance(a, torch.fx.Node) and self.token_dims(node_value(a)):
                raise _Tainted(f"{node.name}: {what} have the token dim")

    def count_fill(self, node, index: int) -> None:
        """`full(size, n)`: a fill value must be a Python number, so the count as a fill keeps the graph exact."""
        arg = _arg(node, index, "fill_value")
        v = node_value(arg) if isinstance(arg, torch.fx.Node) else None
        if isinstance(v, (torch.SymInt, torch.SymFloat)) and self.has_token(v):
            raise _Tainted(f"{node.name}: fills a tensor with the token count")

    def count_use(self, node, position, expr) -> None:
        if expr.free_symbols - {self.token}:
            raise _Tainted(f"{node.name}: uses {expr} as a value, which mixes the token count with other sizes")
        if not _emittable(expr):
            raise _Tainted(f"{node.name}: uses {expr} as a value, which pcg cannot compute from the device count")
        self.counts.append(CountUse(node, position, expr))

    def pointwise(self, node, name) -> None:
        for position, arg in [*enumerate(node.args), *node.kwargs.items()]:
            v = node_value(arg) if isinstance(arg, torch.fx.Node) else None
            if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) and self.has_token(v):
                if not _takes_tensor_values(node, name):
                    # `tril(x, diagonal=n)`, `x.to(...)`: an int parameter, not a value a tensor can stand for
                    raise _Tainted(f"{node.name}: {name} takes the token count as a parameter")
                self.count_use(node, position, self.expr(v))
        first = node.args[0] if node.args else None
        if (first in self.iota and name in ("add", "sub", "to", "int", "long", "contiguous", "clone", "type")
                and all(a == 0 for a in node.args[1:] if isinstance(a, (int, float)))
                and not any(isinstance(a, torch.fx.Node) for a in node.args[1:])):
            self.iota[node] = self.iota[first]

    def permute(self, node, name) -> None:
        src = node.args[0]
        if src in self.iota:
            ins, outs = self.token_dims(node_value(src)), self.token_dims(node_value(node))
            if len(ins) == 1 and len(outs) == 1:
                self.iota[node] = outs[0]

    def reshape(self, node) -> None:
        src = node.args[0]
        in_shape = [self.expr(s) for s in node_value(src).shape]
        out_shape = [self.expr(s) for s in node_value(node).shape]
        mapping = {}
        for t in self.token_dims(node_value(src)):
            before, after = sympy.Mul(*in_shape[:t]), sympy.Mul(*in_shape[t + 1:])
            match = [u for u in range(len(out_shape))
                     if _same(out_shape[u], in_shape[t]) and _same(sympy.Mul(*out_shape[:u]), before)
                     and _same(sympy.Mul(*out_shape[u + 1:]), after)]
            if not match:
                raise _Tainted(f"{node.name}: a reshape merges or splits the token dim "
                               f"({list(in_shape)} -> {list(out_shape)})")
            mapping[t] = match[0]
        if len(mapping) != len(self.token_dims(node_value(node))):
            raise _Tainted(f"{node.name}: a reshape makes a new dim from the token count")
        if src in self.iota and self.iota[src] in mapping:
            self.iota[node] = mapping[self.iota[src]]

    def split(self, node) -> None:
        value = node_value(node.args[0])
        dim = _arg(node, 2, "dim", 0)
        if target_name(node) == "unbind":
            dim = _arg(node, 1, "dim", 0)
        if isinstance(dim, int) and dim % value.dim() in self.token_dims(value):
            raise _Tainted(f"{node.name}: splits the token dim")

    def diff(self, node) -> None:
        value = node_value(node.args[0])
        dim = _arg(node, 2, "dim", -1)
        if _arg(node, 4, "append") is not None and dim % value.dim() in self.token_dims(value):
            raise _Tainted(f"{node.name}: diff appends rows after the token dim's end")

    def reduced_dims(self, node, name, value) -> list[int]:
        index, default = _REDUCTIONS.get(name, (1, None))
        dim = _arg(node, index, "dim", default)
        if dim is None:
            return list(range(value.dim()))
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        if not all(isinstance(d, int) for d in dims):
            raise _Tainted(f"{node.name}: {name} over a dim pcg cannot read ({dim})")
        return [d % max(value.dim(), 1) for d in dims]

    def reduction(self, node, name) -> None:
        value = node_value(node.args[0])
        if set(self.reduced_dims(node, name, value)) & set(self.token_dims(value)):
            raise _Tainted(f"{node.name}: {name} reads across the token dim")

    def norm(self, node, name) -> None:
        value = node_value(node.args[0])
        tokens = self.token_dims(value)
        if name == "group_norm":
            reduced = range(1, value.dim())
        else:
            shape = _arg(node, 1, "normalized_shape")
            reduced = range(value.dim() - len(shape), value.dim())
        if set(reduced) & set(tokens):
            raise _Tainted(f"{node.name}: {name} normalizes across the token dim")
        self.no_token_in(node, node.args[2:], "the norm's weights")

    def matmul(self, node) -> None:
        args = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if target_name(node) in ("baddbmm", "addmm", "addbmm"):
            args = args[1:]
        a, b = (node_value(x) for x in args[:2])
        contracted = [(a, a.dim() - 1), (b, b.dim() - 2 if b.dim() > 1 else 0)]
        if any(d in self.token_dims(t) for t, d in contracted):
            raise _Tainted(f"{node.name}: a matmul contracts over the token dim")

    def einsum(self, node) -> None:
        equation = node.args[0]
        operands = node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        if not isinstance(equation, str) or "..." in equation or "->" not in equation:
            self.unknown(node, "einsum")
            return
        inputs, output = equation.replace(" ", "").split("->")
        for letters, operand in zip(inputs.split(","), operands):
            for d in self.token_dims(node_value(operand)):
                if letters[d] not in output:
                    raise _Tainted(f"{node.name}: einsum contracts over the token dim")

    def cat(self, node) -> None:
        tensors = node.args[0]
        dim = _arg(node, 1, "dim", 0)
        out = node_value(node)
        dim %= out.dim()
        if dim not in self.token_dims(out):
            return
        # Rows of every part but the last sit before the token rows: only a last part may carry them.
        sizes = [node_value(t).shape[dim] for t in tensors]
        if any(self.has_token(s) for s in sizes[:-1]):
            raise _Tainted(f"{node.name}: concatenates rows after a token dim")

    def arange(self, node) -> None:
        args = list(node.args)
        start, step = (0, 1) if len(args) <= 1 else (args[0], args[2] if len(args) > 2 else 1)
        start, step = node.kwargs.get("start", start), node.kwargs.get("step", step)
        values = [node_value(x) if isinstance(x, torch.fx.Node) else x for x in (start, step)]
        if any(isinstance(v, (torch.SymInt, torch.SymFloat)) and self.has_token(v) for v in values):
            raise _Tainted(f"{node.name}: arange starts or steps by the token count, so its values depend on it")
        if values == [0, 1]:
            self.iota[node] = 0

    def sdpa(self, node) -> None:
        mask = _arg(node, 3, "attn_mask")
        if not self.touches_tokens(node):
            return
        if mask is None and _arg(node, 5, "is_causal", False) is True:
            return   # causal attention over the prefill: a real query never sees a later (padded) key
        raise _Tainted(f"{node.name}: attention that is not causal over the token dim")

    def gather(self, node, name) -> None:
        value = node_value(node.args[0])
        dim = _arg(node, 1, "dim")
        if not isinstance(dim, int):
            raise _Tainted(f"{node.name}: {name} along a dim pcg cannot read")
        dim %= value.dim()
        index = _arg(node, 2, "index")
        if dim in self.token_dims(value) and not (name == "index_select" and index in self.iota):
            raise _Tainted(f"{node.name}: {name} reads rows of the token dim at indices computed from data")

    # --- picking rows --------------------------------------------------------------------------------------------
    def absolute(self, size, offset) -> sympy.Expr:
        """A Python index into a dim of `size`, made non-negative (negative counts from the end)."""
        value = node_value(offset) if isinstance(offset, torch.fx.Node) else offset
        e = self.expr(value)
        hint = self.hint(value)
        if hint is None:
            hint = int(e) if e.is_Integer else None
        if hint is None:
            raise _Tainted(f"index {e} has no known sign")
        return sympy.expand(self.expr(size) + e) if hint < 0 else e

    def pick(self, node, source, dim, size, start, length, keep_dim, position) -> None:
        """Rows start.. of a token dim: a shift when `start` is fixed, a pick from the end when it moves with n."""
        start = self.absolute(size, start)
        if self.token not in start.free_symbols:
            if not keep_dim and start != 0:
                raise _Tainted(f"{node.name}: picks row {start} of the token dim, which may be a padded row")
            return
        if isinstance(length, (torch.SymInt,)) or not isinstance(length, int):
            raise _Tainted(f"{node.name}: picks a count-dependent number of rows from the token dim's end")
        if not _emittable(start) or start.free_symbols - {self.token}:
            raise _Tainted(f"{node.name}: picks rows from {start}, which pcg cannot compute on the device")
        if _written_through(node):
            # A gather is a copy: a write through the view would no longer reach the source.
            raise _Tainted(f"{node.name}: rows picked from the token dim's end are written in place")
        self.picks.append(Pick(node, source, dim, start, length, keep_dim, position))

    def narrow_or_select(self, node, name) -> None:
        source = node.args[0]
        value = node_value(source)
        dim = _arg(node, 1, "dim") % value.dim()
        if dim not in self.token_dims(value):
            return
        if name == "select":
            self.pick(node, source, dim, value.shape[dim], _arg(node, 2, "index"), 1, False, None)
        else:
            length = node_value(node).shape[dim]
            self.pick(node, source, dim, value.shape[dim], _arg(node, 2, "start"), length, True, None)

    def getitem(self, node) -> None:
        source, index = node.args
        value = node_value(source)
        parts = _normalize_index(index, value.dim())
        if parts is None:
            self.unknown(node, "getitem with this index")
            return
        tokens = set(self.token_dims(value))
        advanced = any(isinstance(p, torch.fx.Node) and isinstance(node_value(p), torch.Tensor) for p in parts)
        dim = out_dim = 0
        out_value = node_value(node)
        iota_out = None
        for position, part in enumerate(parts):
            if part is None:
                out_dim += 1
                continue
            is_token = dim in tokens
            if isinstance(part, slice):
                if is_token:
                    if part.step not in (None, 1):
                        raise _Tainted(f"{node.name}: a strided slice of the token dim")
                    if advanced:
                        raise _Tainted(f"{node.name}: a slice of the token dim mixed with advanced indexing")
                    length = out_value.shape[out_dim]
                    self.pick(node, source, dim, value.shape[dim], 0 if part.start is None else part.start,
                              length, True, position)
                if source in self.iota and self.iota[source] == dim and part == slice(None):
                    iota_out = out_dim
                out_dim += 1
            elif isinstance(part, torch.fx.Node) and isinstance(node_value(part), torch.Tensor):
                idx = node_value(part)
                if idx.dtype == torch.bool:
                    if is_token or self.token_dims(idx):
                        raise _Tainted(f"{node.name}: a boolean mask selects rows of the token dim")
                elif is_token and not (part in self.iota and len(self.token_dims(idx)) == 1):
                    raise _Tainted(f"{node.name}: reads rows of the token dim at indices computed from data")
                out_dim += 1
            else:   # an integer, or a size of the count
                if is_token:
                    self.pick(node, source, dim, value.shape[dim], part, 1, False, position)
            dim += 1
        if iota_out is not None and not advanced:
            self.iota[node] = iota_out


def _written_through(node: torch.fx.Node) -> bool:
    """Whether some node writes `node`'s value in place, directly or through views of it."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            if current in written_args(user):
                return True
            if target_name(user) in VIEW_NAMES and user.args and user.args[0] is current:
                stack.append(user)
    return False


def _normalize_index(index, ndim: int):
    """A getitem index as a tuple with one entry per source dim (plus Nones), Ellipsis expanded."""
    parts = list(index) if isinstance(index, tuple) else [index]
    consumed = sum(1 for p in parts if p is not None and p is not Ellipsis)
    if any(isinstance(p, torch.fx.Node) and isinstance(node_value(p), torch.Tensor)
           and node_value(p).dtype == torch.bool and node_value(p).dim() != 1 for p in parts):
        return None
    if parts.count(Ellipsis) > 1:
        return None
    if Ellipsis in parts:
        at = parts.index(Ellipsis)
        parts[at:at + 1] = [slice(None)] * (ndim - consumed)
    else:
        parts += [slice(None)] * (ndim - consumed)
    return parts


def _same(a, b) -> bool:
    return a == b or sympy.expand(a - b) == 0


def _emittable(expr: sympy.Expr) -> bool:
    """Arithmetic `row_rewrites.emit` can compute on the device: sums, products, integer powers, constants."""
    if expr.is_Symbol or expr.is_Number:
        return True
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        return all(_emittable(a) for a in expr.args)
    if isinstance(expr, sympy.Pow):
        return _emittable(expr.base) and expr.exp.is_Integer
    return False


def analyse(gm: torch.fx.GraphModule, token, aliases=(), keyed=()) -> PaddingPlan:
    """Decide whether `gm` may be padded along `token` (and the symbols in `aliases`, equal to it at run time)."""
    if token is None:
        return PaddingPlan(None, [], [])
    return _Analysis(gm, token, aliases, keyed).run()
