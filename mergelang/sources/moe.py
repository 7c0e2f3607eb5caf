"""Mixture of experts from dense models (mergekit-moe): a derived model whose experts are the MLPs
of dense models, in the layout current transformers writes and loads.

    model moe = moe(base, [code, math], gate = "cheap_embed",
                    prompts = [["def f(x):"], ["Solve 2x + 3 = 7"]], experts_per_token = 2)
    merge from moe { "*" => moe }

The model's tensors: `base`'s attention, norms and embeddings; per layer
`mlp.experts.gate_up_proj` [E, 2I, H] (each expert's gate_proj rows, then its up_proj rows),
`mlp.experts.down_proj` [E, H, I] and the router `mlp.gate.weight` [E, H]; with
`output = "qwen2_moe"` also the shared expert (`mlp.shared_expert.*` from `shared`) and its gate
`mlp.shared_expert_gate.weight` [1, H]. Its config.json is `base`'s, rewritten for
MixtralForCausalLM / Qwen2MoeForCausalLM (expert counts, experts per token), as mergekit does.

Router initialisation, as mergekit-moe's `gate_mode` (mergekit/moe/router.py):
* `random`: standard normal, from a seeded generator (`seed`; mergekit's is unseeded);
* `cheap_embed`: per expert, the sum of the base's token embeddings of its prompts (minus its
  negative prompts'), normalised, the same for every layer (tokenizer and embeddings only);
* `hidden`: per expert and layer, the base model's hidden state at the last token of each
  prompt (left-padded), averaged over the prompts, minus the negative prompts', normalised —
  one forward pass of the base model per prompt list, with transformers, on the CPU.
The routers are computed once, when the first one is read.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mergelang.diagnostics import Span, error
from mergelang.io.checkpoint import ModelSource, TensorInfo
from mergelang.lang.intrinsics.registry import Elab, intrinsic
from mergelang.lang.values import Const, ListV, ModelV, Value, is_number

if TYPE_CHECKING:
    import torch

GATES = ("random", "cheap_embed", "hidden")
OUTPUTS = {"mixtral": ("MixtralForCausalLM", "mixtral"), "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2_moe")}
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoeSpec:
    base: str
    experts: tuple[str, ...]
    gate: str
    prompts: tuple[tuple[str, ...], ...]
    negative: tuple[tuple[str, ...], ...]
    experts_per_token: int
    output: str
    shared: str | None
    shared_prompts: tuple[str, ...]
    seed: int
    residual_scale: tuple[float, ...]

    def open_model(self, decl: Any, models: dict[str, ModelSource | None], base_dir: Path,
                   diags: Any, pending: set[str]) -> None:
        names = [self.base, *self.experts, *([self.shared] if self.shared else [])]
        srcs = {}
        for n in names:
            m = models.get(n)
            if m is None:
                if n in pending:
                    diags.add(error("E201", f"`{n}` is declared later; declare it before `{decl.name}`",
                                    decl.value.span))
                return
            srcs[n] = m
        try:
            models[decl.name] = MoeSource(decl.name, self, srcs)
        except ValueError as exc:
            diags.add(error("E323", f"model `{decl.name}`: {exc}", decl.value.span,
                            "every expert must be the same architecture as the base, with the same "
                            "MLP shapes"))


def _strings(el: Elab, v: Value, what: str, span: Span) -> tuple[str, ...]:
    if isinstance(v, Const) and v.value is None:
        return ()
    if isinstance(v, ListV) and all(isinstance(i, Const) and isinstance(i.value, str) for i in v.items):
        return tuple(i.value for i in v.items)  # type: ignore[union-attr]
    raise el.error("E324", f"moe's `{what}` must be a list of strings, got {v.describe()}", span)


@intrinsic("moe", "base", "experts", ("gate", "random"), ("prompts", None), ("negative_prompts", None),
           ("experts_per_token", 2), ("output", "mixtral"), ("shared", None), ("shared_prompts", None),
           ("seed", 0), ("residual_scale", None),
           doc="a mixture-of-experts model from dense models (mergekit-moe): base's attention, each "
               "expert model's MLP as an expert, routers by gate = \"random\" | \"cheap_embed\" | "
               "\"hidden\"; output = \"mixtral\" | \"qwen2_moe\" (with a shared expert); use in "
               "`model NAME = moe(...)`")
def _moe(el: Elab, a: dict[str, Value], span: Span) -> Value:
    if el.tensor:
        raise el.error("E201", "moe(...) declares a model: use it as `model NAME = moe(...)`", span)
    base, ex = a["base"], a["experts"]
    if not isinstance(base, ModelV):
        raise el.error("E324", f"moe's base must be a model, got {base.describe()}", span)
    if not (isinstance(ex, ListV) and ex.items and all(isinstance(i, ModelV) for i in ex.items)):
        raise el.error("E324", "moe's experts must be a non-empty list of models", span)
    experts = tuple(i.name for i in ex.items)  # type: ignore[union-attr]
    gate = a["gate"].value if isinstance(a["gate"], Const) else None  # type: ignore[union-attr]
    if gate not in GATES:
        raise el.error("E324", f"moe's gate must be one of {', '.join(GATES)}, got {gate!r}", span)
    output = a["output"].value if isinstance(a["output"], Const) else None  # type: ignore[union-attr]
    if output not in OUTPUTS:
        raise el.error("E324", f"moe's output must be \"mixtral\" or \"qwen2_moe\", got {output!r}", span)
    k = a["experts_per_token"]
    if not (is_number(k) and int(k.value) == k.value and 1 <= k.value <= len(experts)):  # type: ignore[union-attr]
        raise el.error("E324", f"experts_per_token must be an integer in 1..{len(experts)} (the "
                       "number of experts)", span)
    shared = a["shared"]
    if output == "qwen2_moe" and not isinstance(shared, ModelV):
        raise el.error("E324", "output = \"qwen2_moe\" needs one shared expert: shared = MODEL", span)
    if output == "mixtral" and isinstance(shared, ModelV):
        raise el.error("E324", "Mixtral has no shared expert; use output = \"qwen2_moe\"", span)

    def lists(name: str) -> tuple[tuple[str, ...], ...]:
        v = a[name]
        if isinstance(v, Const) and v.value is None:
            return tuple(() for _ in experts)
        if not (isinstance(v, ListV) and len(v.items) == len(experts)):
            raise el.error("E324", f"moe's `{name}` needs one list of strings per expert "
                           f"({len(experts)})", span)
        return tuple(_strings(el, i, name, span) for i in v.items)
    prompts, negative = lists("prompts"), lists("negative_prompts")
    shared_prompts = _strings(el, a["shared_prompts"], "shared_prompts", span)
    if gate != "random":
        if not all(prompts):
            raise el.error("E324", f"gate = \"{gate}\" needs positive prompts for every expert", span,
                           "prompts = [[\"...\"], [\"...\"]], one list per expert")
        if len(set(prompts)) == 1 and len(experts) > 1:
            raise el.error("E324", "every expert has the same prompts: the router could not tell "
                           "them apart", span)
        if isinstance(shared, ModelV) and not shared_prompts:
            raise el.error("E324", f"gate = \"{gate}\" needs shared_prompts for the shared expert", span)
        if importlib.util.find_spec("transformers") is None:
            raise el.error("E324", f"gate = \"{gate}\" needs transformers (its tokenizer"
                           + (" and model" if gate == "hidden" else "") + ")", span,
                           "pip install transformers, or use gate = \"random\"")
    rs = a["residual_scale"]
    if isinstance(rs, Const) and rs.value is None:
        scales = tuple(1.0 for _ in experts)
    elif isinstance(rs, ListV) and rs.scalars and len(rs.items) == len(experts):
        scales = tuple(float(i.value) for i in rs.items)  # type: ignore[union-attr]
    else:
        raise el.error("E324", f"residual_scale must be one number per expert ({len(experts)})", span)
    seed = a["seed"]
    sv = seed.value if isinstance(seed, Const) else None
    whole = (isinstance(sv, int) and not isinstance(sv, bool)) or (
        isinstance(sv, float) and sv == sv and abs(sv) != float("inf") and sv.is_integer())
    if not (whole and 0 <= sv < 2 ** 63):  # type: ignore[operator]
        raise el.error("E324", f"moe's seed must be a whole number in 0..2**63-1 (the random "
                       f"gate's generator seed), got {str(sv)[:40] if sv is not None else seed.describe()}",
                       span)
    return Const(MoeSpec(base.name, experts, gate, prompts, negative, int(k.value), output,  # type: ignore[union-attr]
                         shared.name if isinstance(shared, ModelV) else None, shared_prompts,
                         int(sv), scales))  # type: ignore[arg-type]


def _model_type(m: Any) -> Any:
    cfg = m.config()
    return cfg.get("model_type") if isinstance(cfg, dict) else None


class MoeSource(ModelSource):
    """The MoE model's tensor table (headers of its sources) and loads (built per tensor)."""

    def __init__(self, label: str, spec: MoeSpec, srcs: Mapping[str, ModelSource]):
        import re

        self.label, self.spec = label, spec
        self.base = srcs[spec.base]
        self.experts = [srcs[e] for e in spec.experts]
        self.shared = srcs[spec.shared] if spec.shared else None
        self.srcs = srcs
        self.folder = self.base.folder
        bt = self.base.tensors()
        layer = re.compile(r"^(.*\.layers\.(\d+)\.)mlp\.gate_proj\.weight$")
        self.layers = sorted(((int(m.group(2)), m.group(1)) for n in bt if (m := layer.match(n))))
        if not self.layers:
            raise ValueError(f"`{spec.base}` has no `layers.N.mlp.gate_proj.weight` tensors (a Llama-"
                             "style MLP with gate, up and down projections is needed)")
        kind = _model_type(self.base)
        for name, src in [*zip(spec.experts, self.experts), *([(spec.shared, self.shared)] if self.shared else [])]:
            other = _model_type(src)
            if kind and other and other != kind:
                raise ValueError(f"expert `{name}` is a {other} model and base `{spec.base}` a {kind} model")
            for _, p in self.layers:
                for proj in MLP:
                    n = f"{p}mlp.{proj}.weight"
                    mine = src.tensors().get(n)  # type: ignore[union-attr]
                    if mine is None or mine.shape != bt[n].shape:
                        got = "has no" if mine is None else f"has {list(mine.shape)} for"
                        raise ValueError(f"expert `{name}` {got} `{n}`; base `{spec.base}` has "
                                         f"{list(bt[n].shape)}")
        dtype = bt[f"{self.layers[0][1]}mlp.gate_proj.weight"].dtype
        e = len(self.experts)
        table: dict[str, TensorInfo] = {}
        self._how: dict[str, tuple[str, Any]] = {}
        for n, info in bt.items():
            if ".mlp." not in n:
                table[n] = info
                self._how[n] = ("base", n)
        hidden = bt[self.layers[0][1] + "mlp.gate_proj.weight"].shape[1]
        for i, p in self.layers:
            inter = bt[f"{p}mlp.gate_proj.weight"].shape[0]
            for n, shape, how in [(f"{p}mlp.gate.weight", (e, hidden), ("router", i)),
                                  (f"{p}mlp.experts.gate_up_proj", (e, 2 * inter, hidden), ("gate_up", p)),
                                  (f"{p}mlp.experts.down_proj", (e, hidden, inter), ("down", p))]:
                table[n] = TensorInfo(n, shape, dtype)
                self._how[n] = how
            if self.shared is not None:
                for proj in MLP:
                    n = f"{p}mlp.shared_expert.{proj}.weight"
                    table[n] = TensorInfo(n, bt[f"{p}mlp.{proj}.weight"].shape, dtype)
                    self._how[n] = ("shared", f"{p}mlp.{proj}.weight")
                n = f"{p}mlp.shared_expert_gate.weight"
                table[n] = TensorInfo(n, (1, hidden), dtype)
                self._how[n] = ("shared_router", i)
        self._table = table
        self._routers: Any = None

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._table

    def load(self, name: str) -> "torch.Tensor":
        import torch

        kind, arg = self._how[name]
        if kind == "base":
            return self.base.load(arg)
        if kind == "shared":
            t = self.shared.load(arg)  # type: ignore[union-attr]
            return t
        if kind == "gate_up":
            return torch.stack([torch.cat([x.load(f"{arg}mlp.gate_proj.weight"),
                                           x.load(f"{arg}mlp.up_proj.weight")]) for x in self.experts])
        if kind == "down":
            return torch.stack([x.load(f"{arg}mlp.down_proj.weight") * s if s != 1.0 else
                                x.load(f"{arg}mlp.down_proj.weight")
                                for x, s in zip(self.experts, self.spec.residual_scale)])
        routers, shared = self._gates()
        dtype = self._table[name].dtype
        from mergelang.ir.types import torch_dtype

        out = routers[arg] if kind == "router" else shared[arg]
        return out.to(torch_dtype(dtype)).contiguous()

    def _gates(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        if self._routers is None:
            from mergelang.sources.moe_router import gate_vectors

            self._routers = gate_vectors(self)
        return self._routers

    def input_paths(self) -> list[Any]:
        return [p for s in self.srcs.values() for p in s.input_paths()]

    def config(self) -> dict | None:
        cfg = self.base.config()
        return {**cfg, **self.config_patch()} if isinstance(cfg, dict) else None

    def config_patch(self) -> dict[str, Any]:
        arch, kind = OUTPUTS[self.spec.output]
        cfg = self.base.config()
        cfg = cfg if isinstance(cfg, dict) else {}
        patch: dict[str, Any] = {"architectures": [arch], "model_type": kind,
                                 "num_experts_per_tok": self.spec.experts_per_token,
                                 "sliding_window": None}
        if self.spec.output == "mixtral":
            patch["num_local_experts"] = len(self.experts)
        else:
            inter = cfg.get("intermediate_size")
            patch.update(num_experts=len(self.experts), decoder_sparse_step=1, norm_topk_prob=True,
                         use_sliding_window=False, moe_intermediate_size=inter,
                         shared_expert_intermediate_size=inter, mlp_only_layers=[])
        return patch

    def close(self) -> None:
        pass  # the sources are models of the recipe: closed with it
