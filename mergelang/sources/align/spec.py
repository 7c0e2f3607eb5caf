"""Permutation group specs: which tensor axes share one permutation of hidden units.

A *group* is a name, a size `n` and members. A member is one axis of one tensor that the group's
permutation `p` (a permutation of `range(n)`) acts on, in the layout

    axis[start : start + repeat * n * block]  viewed as  (repeat, n, block)

whose middle index is permuted: new unit `i` is old unit `p[i]` (`W' = W[idx]`). Positions
outside the covered slice stay put. With `repeat = block = 1` this is a plain axis (MLP hidden
units); `block = head_dim` moves whole attention heads; `repeat = heads, block = 1` permutes the
dimensions *inside* every head by one shared permutation. Groups acting on the same axis always
commute in the built-in specs (whole blocks vs. positions inside every block), so the order in
which they are applied does not matter.

Built-in specs are derived from `config.json` (`spec_for`): the Llama family (llama, mistral,
qwen2, qwen3; grouped-query attention), GPT-2 and BERT. See docs/align.md.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

from mergelang.sources.align.groups import (AlignSpec, Group, Member, SpecError, member_index,  # noqa: F401
                                            permute_tensor, units_view)


def apply_permutations(tensors: Mapping[str, torch.Tensor], spec: AlignSpec,
                       perms: Mapping[str, torch.Tensor], skip: str | None = None,
                       maps: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Permute the spec's tensors (others are returned unchanged); `skip` leaves one group out;
    groups in `maps` (soft OT maps, see soft.py) are mixed by their map instead of permuted."""
    members = spec.by_tensor()
    out = dict(tensors)
    for name, t in tensors.items():
        if name in members:
            if maps:
                from mergelang.sources.align.soft import transform_tensor

                out[name] = transform_tensor(t, members[name], perms, maps)
            else:
                out[name] = permute_tensor(t, members[name], perms, skip)
    return out


def random_permutations(spec: AlignSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.randperm(g.size, generator=gen) for g in spec.groups}


def invert(perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.argsort(p) for k, p in perms.items()}


# ------------------------------------------------------------------ built-in specs
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GPT2_TYPES = ("gpt2",)
BERT_TYPES = ("bert",)


def spec_for(config: Mapping[str, Any] | None, shapes: Mapping[str, Sequence[int]]) -> AlignSpec:
    """The built-in spec for a model, from its config.json (or its tensor names when there is
    no config: residual stream and MLP groups only, heads left fixed)."""
    kind = (config or {}).get("model_type")
    names = list(shapes)
    if kind in LLAMA_TYPES or (kind is None and any(n.endswith("self_attn.q_proj.weight") for n in names)):
        return llama_spec(config, shapes)
    if kind in GPT2_TYPES or (kind is None and any(n.endswith("attn.c_attn.weight") for n in names)):
        return gpt2_spec(config, shapes)
    if kind in BERT_TYPES or (kind is None and any(n.endswith("attention.self.query.weight") for n in names)):
        return bert_spec(config, shapes)
    if kind in ("deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral"):
        raise SpecError(f"no built-in permutation spec for the mixture-of-experts model_type "
                        f"{kind!r}: its experts would have to be matched before its hidden units "
                        "(give the groups to permute with groups = [...])")
    raise SpecError(f"no built-in permutation spec for model_type {kind!r}" if kind else
                    "no config.json and the tensor names match no built-in architecture")


class _Builder:
    def __init__(self, names: Sequence[str]):
        self.names = set(names)
        self.groups: list[Group] = []

    def group(self, name: str, size: int, members: list[tuple]) -> None:
        ms = tuple(Member(t, *rest) for t, *rest in members if t in self.names)
        if ms and size > 1:
            self.groups.append(Group(name, size, ms))


def _layers(names: Sequence[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for n in names if (m := rx.match(n))})


def _prefix(names: Sequence[str], leaf: str) -> str:
    for n in names:
        if n.endswith(leaf):
            return n[: -len(leaf)]
    return ""


def _layout(names: Sequence[str], leaf: str, first_layer_leaf: str, layer: str) -> tuple[str, list[int]]:
    """The tensors' name prefix (found by `leaf`, else by a first-layer tensor) and the layer
    numbers of names matching prefix + `layer` (a regex with the number as group 1)."""
    p = _prefix(names, leaf) or _prefix(names, first_layer_leaf)
    return p, _layers(names, re.escape(p) + layer)


def llama_spec(config: Mapping[str, Any] | None, shapes: Mapping[str, Sequence[int]]) -> AlignSpec:
    cfg = dict(config or {})
    names = list(shapes)
    p, layers = _layout(names, "embed_tokens.weight", "layers.0.self_attn.q_proj.weight", r"layers\.(\d+)\.")
    b = _Builder(names)
    note = "query/key dims inside a head stay fixed (rotary embeddings pair them)"
    if "hidden_size" not in cfg:  # no config.json: sizes from shapes, heads unknown (left fixed)
        note = "no config.json: attention heads and head dims stay fixed (head size unknown)"
        gate = shapes.get(f"{p}layers.{layers[0]}.mlp.gate_proj.weight") if layers else None
        if gate is None:
            raise SpecError("no config.json, and the tensor names do not look like a Llama model")
        cfg.update(hidden_size=gate[1], intermediate_size=gate[0], num_attention_heads=1,
                   num_key_value_heads=1, head_dim=1)
    D = cfg["hidden_size"]
    H = cfg.get("num_attention_heads", 0)
    KV = cfg.get("num_key_value_heads") or H
    d = cfg.get("head_dim") or (D // H if H else 0)
    I = cfg.get("intermediate_size", 0)
    res: list[tuple] = [(p + "embed_tokens.weight", 1), (p + "norm.weight", 0), ("lm_head.weight", 1)]
    for i in layers:
        L = f"{p}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            res.append((L + f"self_attn.{proj}.weight", 1))
        for proj in ("gate_proj", "up_proj"):
            res.append((L + f"mlp.{proj}.weight", 1))
        res += [(L + "self_attn.o_proj.weight", 0), (L + "self_attn.o_proj.bias", 0),
                (L + "mlp.down_proj.weight", 0), (L + "mlp.down_proj.bias", 0),
                (L + "input_layernorm.weight", 0), (L + "post_attention_layernorm.weight", 0)]
    b.group("residual", D, res)
    G = H // KV if KV else 1
    for i in layers:
        L = f"{p}layers.{i}."
        b.group(f"layers.{i}.mlp", I, [
            (L + "mlp.gate_proj.weight", 0), (L + "mlp.up_proj.weight", 0),
            (L + "mlp.gate_proj.bias", 0), (L + "mlp.up_proj.bias", 0), (L + "mlp.down_proj.weight", 1)])
        # a KV head and the G query heads that read it move together (q rows / o columns blockwise)
        heads = [(L + "self_attn.q_proj.weight", 0, 1, G * d), (L + "self_attn.q_proj.bias", 0, 1, G * d),
                 (L + "self_attn.o_proj.weight", 1, 1, G * d)]
        for proj in ("k_proj", "v_proj"):
            heads += [(L + f"self_attn.{proj}.weight", 0, 1, d), (L + f"self_attn.{proj}.bias", 0, 1, d)]
        b.group(f"layers.{i}.kv_heads", KV, heads)
        # the value dims inside every head (one permutation shared by all heads of the layer)
        b.group(f"layers.{i}.vo_dims", d, [
            (L + "self_attn.v_proj.weight", 0, KV), (L + "self_attn.v_proj.bias", 0, KV),
            (L + "self_attn.o_proj.weight", 1, H)])
    return AlignSpec(cfg.get("model_type", "llama"), tuple(b.groups), note)


def gpt2_spec(config: Mapping[str, Any] | None, shapes: Mapping[str, Sequence[int]]) -> AlignSpec:
    cfg = dict(config or {})
    names = list(shapes)
    if "n_embd" not in cfg:
        raise SpecError("a GPT-2 model needs its config.json (n_embd, n_head) to be aligned")
    p, layers = _layout(names, "wte.weight", "h.0.attn.c_attn.weight", r"h\.(\d+)\.")
    D, H = cfg["n_embd"], cfg["n_head"]
    d, I = D // H, cfg.get("n_inner") or 4 * cfg["n_embd"]
    b = _Builder(names)
    # Conv1D stores weights as (in, out): inputs on axis 0, outputs on axis 1
    res: list[tuple] = [(p + "wte.weight", 1), (p + "wpe.weight", 1), (p + "ln_f.weight", 0),
                        (p + "ln_f.bias", 0), ("lm_head.weight", 1)]
    for i in layers:
        L = f"{p}h.{i}."
        res += [(L + "ln_1.weight", 0), (L + "ln_1.bias", 0), (L + "ln_2.weight", 0), (L + "ln_2.bias", 0),
                (L + "attn.c_attn.weight", 0), (L + "attn.c_proj.weight", 1), (L + "attn.c_proj.bias", 0),
                (L + "mlp.c_fc.weight", 0), (L + "mlp.c_proj.weight", 1), (L + "mlp.c_proj.bias", 0)]
    b.group("residual", D, res)
    for i in layers:
        L = f"{p}h.{i}."
        b.group(f"h.{i}.mlp", I, [(L + "mlp.c_fc.weight", 1), (L + "mlp.c_fc.bias", 0),
                                  (L + "mlp.c_proj.weight", 0)])
        b.group(f"h.{i}.heads", H, [(L + "attn.c_attn.weight", 1, 3, d), (L + "attn.c_attn.bias", 0, 3, d),
                                    (L + "attn.c_proj.weight", 0, 1, d)])
        # no rotary in GPT-2: q and k dims inside a head may move together, v dims with c_proj rows
        b.group(f"h.{i}.qk_dims", d, [(L + "attn.c_attn.weight", 1, H, 1, 0), (L + "attn.c_attn.weight", 1, H, 1, D),
                                      (L + "attn.c_attn.bias", 0, H, 1, 0), (L + "attn.c_attn.bias", 0, H, 1, D)])
        b.group(f"h.{i}.vo_dims", d, [(L + "attn.c_attn.weight", 1, H, 1, 2 * D),
                                      (L + "attn.c_attn.bias", 0, H, 1, 2 * D),
                                      (L + "attn.c_proj.weight", 0, H, 1)])
    return AlignSpec("gpt2", tuple(b.groups), "GPT-2 has no rotary: q/k dims inside a head are a group")


def bert_spec(config: Mapping[str, Any] | None, shapes: Mapping[str, Sequence[int]]) -> AlignSpec:
    """BERT (post-LayerNorm encoder, absolute positions, nn.Linear (out, in) weights)."""
    cfg = dict(config or {})
    names = list(shapes)
    if "hidden_size" not in cfg:
        raise SpecError("a BERT model needs its config.json (hidden_size, num_attention_heads) to be aligned")
    p, layers = _layout(names, "embeddings.word_embeddings.weight",
                        "encoder.layer.0.attention.self.query.weight", r"encoder\.layer\.(\d+)\.")
    D, H, I = cfg["hidden_size"], cfg["num_attention_heads"], cfg.get("intermediate_size", 0)
    d = D // H
    b = _Builder(names)
    E = p + "embeddings."
    res: list[tuple] = [(E + "word_embeddings.weight", 1), (E + "position_embeddings.weight", 1),
                        (E + "token_type_embeddings.weight", 1), (E + "LayerNorm.weight", 0),
                        (E + "LayerNorm.bias", 0), (p + "pooler.dense.weight", 1)]
    # a masked-LM head: its transform reads the residual; its output is read by the decoder, whose
    # weight may be tied to the word embeddings, so the transform's output moves with the residual too
    T = "cls.predictions."
    res += [(T + "transform.dense.weight", 1), (T + "transform.dense.weight", 0), (T + "transform.dense.bias", 0),
            (T + "transform.LayerNorm.weight", 0), (T + "transform.LayerNorm.bias", 0), (T + "decoder.weight", 1)]
    for i in layers:
        L = f"{p}encoder.layer.{i}."
        for proj in ("query", "key", "value"):
            res.append((L + f"attention.self.{proj}.weight", 1))
        res += [(L + "attention.output.dense.weight", 0), (L + "attention.output.dense.bias", 0),
                (L + "attention.output.LayerNorm.weight", 0), (L + "attention.output.LayerNorm.bias", 0),
                (L + "intermediate.dense.weight", 1), (L + "output.dense.weight", 0), (L + "output.dense.bias", 0),
                (L + "output.LayerNorm.weight", 0), (L + "output.LayerNorm.bias", 0)]
    b.group("residual", D, res)
    for i in layers:
        L = f"{p}encoder.layer.{i}."
        S = L + "attention.self."
        b.group(f"layer.{i}.mlp", I, [(L + "intermediate.dense.weight", 0), (L + "intermediate.dense.bias", 0),
                                      (L + "output.dense.weight", 1)])
        b.group(f"layer.{i}.heads", H, [(S + f"{x}.{w}", 0, 1, d) for x in ("query", "key", "value")
                                        for w in ("weight", "bias")] +
                [(L + "attention.output.dense.weight", 1, 1, d)])
        # no rotary: the q and k dims inside a head move together (q·k is invariant); relative
        # position embeddings (older transformers) act on those dims, so they stay fixed then
        if cfg.get("position_embedding_type", "absolute") == "absolute":
                b.group(f"layer.{i}.qk_dims", d, [(S + f"{x}.{w}", 0, H) for x in ("query", "key")
                                              for w in ("weight", "bias")])
        b.group(f"layer.{i}.vo_dims", d, [(S + "value.weight", 0, H), (S + "value.bias", 0, H),
                                          (L + "attention.output.dense.weight", 1, H)])
    return AlignSpec("bert", tuple(b.groups), "absolute positions, no rotary: q/k dims inside a head are a group")


# ------------------------------------------------------------------ custom groups (recipes)
_MEMBER = re.compile(r"(?P<pat>.+)@(?P<axis>-?\d+)(?:x(?P<block>\d+))?")


def custom_spec(texts: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> AlignSpec:
    """Groups written in a recipe, one string each: `"NAME: PATTERN@AXIS PATTERN@AXIS ..."`.

    PATTERN is a tensor-name glob (`*`, `{i}` integer captures); `@AXIS` the permuted axis,
    `@AXISxB` moves blocks of B positions as one unit (e.g. heads). A group whose patterns
    capture `{i}` becomes one group per captured value (`mlp[i=0]`, `mlp[i=1]`, ...). The
    group's size is the first member's axis length / B; every member must agree."""
    from mergelang.lang.ast import glob_to_regex

    found: dict[str, list[tuple[str, int, int]]] = {}
    for text in texts:
        name, sep, body = text.partition(":")
        name = name.strip()
        if not sep or not name or not body.split():
            raise SpecError(f"group {text!r}: expected \"NAME: PATTERN@AXIS ...\"")
        for tok in body.replace(",", " ").split():
            m = _MEMBER.fullmatch(tok)
            if m is None:
                raise SpecError(f"group `{name}`: member {tok!r} is not PATTERN@AXIS (or PATTERN@AXISxBLOCK)")
            regex, _ = glob_to_regex(m["pat"])
            rx = re.compile(regex)
            hits = 0
            for tensor in shapes:
                mt = rx.fullmatch(tensor)
                if mt is None:
                    continue
                hits += 1
                caps = "".join(f"[{k}={v}]" for k, v in sorted(mt.groupdict().items()) if v is not None)
                found.setdefault(name + caps, []).append((tensor, int(m["axis"]), int(m["block"] or 1)))
            if not hits:
                raise SpecError(f"group `{name}`: pattern {m['pat']!r} matches no tensor")
    groups = []
    for gname, members in found.items():
        t0, a0, b0 = members[0]
        shape0 = shapes[t0]
        if not -len(shape0) <= a0 < len(shape0):
            raise SpecError(f"group `{gname}`: `{t0}` has no axis {a0}")
        size = shape0[a0] // b0
        ms = []
        for t, a, blk in members:
            shape = shapes[t]
            if not -len(shape) <= a < len(shape) or shape[a] != size * blk:
                got = f"axis {a} of length {shape[a]}" if -len(shape) <= a < len(shape) else f"no axis {a}"
                raise SpecError(f"group `{gname}` has size {size} (from `{t0}`), but `{t}` has {got}"
                                + (f" (block {blk})" if blk > 1 else ""))
            ms.append(Member(t, a % len(shape), 1, blk))
        groups.append(Group(gname, size, tuple(ms)))
    return AlignSpec("custom", tuple(groups), "groups declared in the recipe")
