"""Linear-algebra intrinsics: svd, polar, matmul, concat_models (2-D tensors, float32)."""

from __future__ import annotations

from typing import Any

from mergelang.diagnostics import Span, warning
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.ir.ops import Attrs, Op
from mergelang.lang.values import Const, TensorV, Value, is_number


@intrinsic("svd", "x", "part", ("k", None),
           doc="thin SVD (in the compute dtype) of a 2-D tensor (per model of a stack): part "
               "\"U\", \"S\" or \"Vh\", keeping the k leading singular triplets (default: all); "
               "the singular vectors of numerically zero singular values (not determined) are 0")
def _svd(el: Elab, a: dict[str, Value], span: Span) -> Value:
    part, k = a["part"], a["k"]
    if not (isinstance(part, Const) and part.value in ("U", "S", "Vh")):
        raise el.error("E203", "svd's part must be \"U\", \"S\" or \"Vh\"", span)
    x = el.to_node(a["x"], span)
    shape = el.graph.node(x).type.shape
    if isinstance(k, Const) and k.value is None:
        kk = min(shape) if len(shape) == 2 else 1
    elif is_number(k) and float(k.value) == int(k.value):  # type: ignore[union-attr]
        kk = int(k.value)  # type: ignore[union-attr]
    else:
        raise el.error("E201", f"svd's k must be a whole number known at compile time, got "
                       f"{k.describe()}", span)
    return TensorV(el.make(Op.SVD, [x], Attrs(part=part.value, k=kk), span))


@intrinsic("polar", "x", doc="polar factor U Vh of a 2-D tensor: orthogonal on its range, 0 on "
                             "its numerical null space (the partial isometry)")
def _polar(el: Elab, a: dict[str, Value], span: Span) -> Value:
    return TensorV(el.make(Op.POLAR, [el.to_node(a["x"], span)], Attrs(), span))


@intrinsic("matmul", "a", "b", doc="matrix product of 2-D tensors")
def _matmul(el: Elab, a: dict[str, Value], span: Span) -> Value:
    return TensorV(el.make(Op.MATMUL, [el.to_node(a["a"], span), el.to_node(a["b"], span)],
                           Attrs(), span))


@intrinsic("concat_models", "x", ("axis", 0),
           doc="one tensor from a stack: the models' tensors concatenated along `axis`")
def _concat_models(el: Elab, a: dict[str, Value], span: Span) -> Value:
    axis = a["axis"]
    if not (is_number(axis) and float(axis.value) == int(axis.value)):  # type: ignore[union-attr]
        raise el.error("E201", "concat_models' axis must be a whole number", span)
    return TensorV(el.make(Op.CONCAT_MODELS, [el.to_node(a["x"], span)],
                           Attrs(axis=int(axis.value)), span))  # type: ignore[union-attr]


@intrinsic("shape", "x", doc="the shape of the tensor being merged, as a list of numbers")
def _shape(el: Elab, a: dict[str, Value], span: Span) -> Value:
    from mergelang.lang.values import ListV, ModelV

    x = a["x"]
    if not isinstance(x, (ModelV, TensorV)):
        raise el.error("E201", f"shape needs a tensor, got {x.describe()}", span)
    return ListV(tuple(Const(d) for d in el.graph.node(el.to_node(x, span)).type.shape))


def _matrix_op(op: Op, *names: str) -> Any:
    def impl(el: Elab, a: dict[str, Value], span: Span) -> Value:
        return TensorV(el.make(op, [el.to_node(a[n], span) for n in names], Attrs(), span))
    return impl


intrinsic("solve", "a", "b", doc="X with a X = b (a square; float32; a singular a stops the merge "
                                  "with E501)")(_matrix_op(Op.SOLVE, "a", "b"))
intrinsic("pinv", "x", doc="Moore-Penrose pseudo-inverse of a 2-D tensor (float32 SVD; singular "
                           "values below max(m, n) * eps * the largest count as zero)")(
    _matrix_op(Op.PINV, "x"))
intrinsic("transpose", "x", doc="the transpose of a 2-D tensor")(_matrix_op(Op.TRANSPOSE, "x"))
intrinsic("diagonal", "x", doc="a square matrix with its off-diagonal entries set to 0")(
    _matrix_op(Op.DIAGONAL, "x"))


@intrinsic("wudi_adam", "tv", ("steps", 300), ("lr", 1e-5),
           doc="WUDI's loss sum_i ||(X - tv_i) tv_i^T||^2 / ||tv_i||^2 minimised by `steps` Adam "
               "steps (learning rate `lr`) from X = sum_i tv_i, as the reference implementations "
               "do (a stack of 2-D task vectors -> one 2-D tensor; zero task vectors take no part)")
def _wudi_adam(el: Elab, a: dict[str, Value], span: Span) -> Value:
    steps, lr = a["steps"], a["lr"]
    if not (is_number(steps) and float(steps.value) == int(steps.value) and 0 <= int(steps.value) <= 100_000):  # type: ignore[union-attr]
        raise el.error("E203", f"wudi_adam's steps must be a whole number in [0, 100000], got "
                       f"{steps.describe()}", span)
    if not (is_number(lr) and float(lr.value) > 0):  # type: ignore[union-attr]
        raise el.error("E203", f"wudi_adam's lr must be a positive number, got {lr.describe()}", span)
    return TensorV(el.make(Op.WUDI_ADAM, [el.to_node(a["tv"], span)],
                           Attrs(steps=int(steps.value), lr=float(lr.value)), span))  # type: ignore[union-attr]


@intrinsic("has", "model", doc="true when the model (or every model of a list) has a tensor of "
                               "the name being merged (for sidecar checkpoints)")
def _has(el: Elab, a: dict[str, Value], span: Span) -> Value:
    from mergelang.lang.values import Poisoned
    from mergelang.lang.values import ListV, ModelV

    m = a["model"]
    items = m.items if isinstance(m, ListV) else (m,)
    for item in items:
        if not isinstance(item, ModelV):
            raise el.error("E201", f"has needs a model or a list of models, got {item.describe()}",
                           span)
        source = el.models.get(item.name)
        if source is None:
            raise Poisoned()
        if el.tensor not in source.tensors():
            return Const(False)
    return Const(True)


@intrinsic("same_shape", "x", "like", ("what", "sidecar"),
           doc="x, after checking at compile time that it has the shape of `like` (one per model "
               "for lists): error E210 otherwise")
def _same_shape(el: Elab, a: dict[str, Value], span: Span) -> Value:
    from mergelang.lang.values import ListV

    x, like = a["x"], a["like"]
    what = a["what"].value if isinstance(a["what"], Const) else "sidecar"
    pairs = list(zip(x.items, like.items)) if isinstance(x, ListV) and isinstance(like, ListV) \
        and len(x.items) == len(like.items) else [(x, like)]
    for item, ref in pairs:  # item by item, before the list is stacked
        tx = el.graph.node(el.to_node(item, span)).type
        tl = el.graph.node(el.to_node(ref, span)).type
        if tx.shape != tl.shape or tx.models != tl.models:
            name = f" of `{item.name}`" if hasattr(item, "name") else ""
            raise el.error("E210", f"{what} tensor `{el.tensor}`{name} is {tx}, expected {tl}",
                           span, "a sidecar checkpoint needs a tensor of the same name and shape")
    return x


@intrinsic("layer_index", doc="the first whole-number component of the tensor's name "
                              "(`model.layers.12.mlp.up_proj.weight` -> 12), none when there is none")
def _layer_index(el: Elab, a: dict[str, Value], span: Span) -> Value:
    for part in el.tensor.split("."):
        if part.isdigit():
            return Const(int(part))
    return Const(None)


@intrinsic("cat", "xs", ("axis", 0), doc="a list of tensors concatenated along `axis`")
def _cat(el: Elab, a: dict[str, Value], span: Span) -> Value:
    from mergelang.lang.values import ListV

    xs, axis = a["xs"], a["axis"]
    if not isinstance(xs, ListV) or not xs.items:
        raise el.error("E201", f"cat needs a non-empty list of tensors, got {xs.describe()}", span)
    if not (is_number(axis) and float(axis.value) == int(axis.value)):  # type: ignore[union-attr]
        raise el.error("E201", "cat's axis must be a whole number", span)
    nodes = [el.to_node(x, span) for x in xs.items]
    return TensorV(el.make(Op.CAT, nodes, Attrs(axis=int(axis.value)), span))  # type: ignore[union-attr]


@intrinsic("low_rank", "x", "rank", ("embedding", False), ("energy", None),
           doc="a LoRA pair for a `merge adapter` block: lora_A = sqrt(S) Vh, lora_B = U sqrt(S) "
               "from the float32 SVD of the 2-D delta x, rank min(rank, rows, cols) (B @ A is the "
               "best rank-r approximation); embedding = true decomposes x transposed "
               "(lora_embedding_A / lora_embedding_B, for embedding layers); a stack of deltas "
               "gives a list of pairs, one per model (a multi-name adapter block); energy = e "
               "keeps per tensor the fewest singular directions holding e of sum(s^2) (at most "
               "rank; the files keep rank columns, zero beyond)")
def _low_rank(el: Elab, a: dict[str, Value], span: Span) -> Value:
    rank, emb = a["rank"], a["embedding"]
    if not (is_number(rank) and float(rank.value) == int(rank.value) and rank.value >= 1):  # type: ignore[union-attr]
        raise el.error("E201", f"low_rank's rank must be a whole number >= 1 known at compile "
                       f"time, got {getattr(rank, 'value', rank.describe())}", span)
    if not (isinstance(emb, Const) and isinstance(emb.value, bool)):
        raise el.error("E201", "low_rank's embedding must be true or false", span)
    energy = a["energy"]
    if not (isinstance(energy, Const) and energy.value is None) and not (
            is_number(energy) and 0 < energy.value <= 1):  # type: ignore[union-attr]
        raise el.error("E203", "low_rank's energy must be a number in (0, 1] (the fraction of "
                       "sum(s^2) kept), or none", span)
    e = None if isinstance(energy, Const) and energy.value is None else float(energy.value)  # type: ignore[union-attr]
    x = el.to_node(a["x"], span)
    models = el.graph.node(x).type.models
    if models is not None:  # a stack: one pair per model (a multi-name adapter block)
        from mergelang.lang.values import ListV

        return ListV(tuple(_pair(el, el.make(Op.INDEX, [x], Attrs(i=i), span), int(rank.value),  # type: ignore[union-attr]
                                 bool(emb.value), span, e) for i in range(models)))
    return _pair(el, x, int(rank.value), bool(emb.value), span, e)  # type: ignore[union-attr]


def _pair(el: Elab, x: int, rank: int, embedding: bool, span: Span, energy: float | None = None) -> Value:
    from mergelang.lang.values import LowRank

    if embedding:
        x = el.make(Op.TRANSPOSE, [x], Attrs(), span)
    ty = el.graph.node(x).type
    if len(ty.shape) != 2:
        raise el.error("E201", f"low_rank needs a 2-D tensor (a delta), got {ty}", span,
                       "use it in a rule for 2-D weights (e.g. \"*proj.weight\")")
    r = min(rank, *ty.shape)
    if r < rank:
        el.diags.add(warning("W108", f"low_rank's rank {rank} is more than the {ty.shape[0]}x"
                             f"{ty.shape[1]} delta of `{el.tensor}` allows: clamped to {r}", span,
                             "a rank above min(rows, cols) adds nothing"), subject=el.tensor)
    u = el.make(Op.SVD, [x], Attrs(part="U", k=r), span)
    s = el.make(Op.SVD, [x], Attrs(part="S", k=r) if energy is None else
                Attrs(part="S", k=r, energy=energy), span)
    vh = el.make(Op.SVD, [x], Attrs(part="Vh", k=r), span)
    root = el.make(Op.SQRT, [s], Attrs(), span)
    col = el.make(Op.RESHAPE, [root], Attrs(shape=(r, 1)), span)
    a_ = el.make(Op.MUL, [col, vh], Attrs(), span)
    b_ = el.make(Op.MUL, [u, root], Attrs(), span)
    return Const(LowRank(a_, b_, r, embedding))
