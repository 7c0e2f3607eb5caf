"""Router initialisation for `moe(...)` (sources/moe.py), following mergekit-moe's
`get_gate_params` (mergekit/moe/router.py) and its tokenizer set-up (scripts/moe.py: left
padding, the BOS token as padding, each prompt prefixed with the BOS token's text)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


def _tokenizer(folder: Any) -> Any:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenize(tok: Any, prompts: tuple[str, ...]) -> Any:
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
               add_special_tokens=False)


def _cheap_embed(src: Any, tok: Any, layers: int) -> Callable[[Any], "torch.Tensor"]:
    import torch

    name = next((n for n in src.base.tensors() if n.endswith("embed_tokens.weight")), None)
    if name is None:
        raise RuntimeError("gate = \"cheap_embed\" needs the base's `embed_tokens.weight`")
    embed = src.base.load(name).float()

    def run(tokenized: Any) -> torch.Tensor:
        onehot = torch.nn.functional.one_hot(tokenized["input_ids"], num_classes=embed.shape[0])
        h = onehot.float() @ embed
        e = (h * tokenized["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        res = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return res.repeat(layers, 1)
    return run


def _hidden(src: Any) -> Callable[[Any], "torch.Tensor"]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(src.base.folder), dtype=torch.bfloat16)
    model.eval()

    def run(tokenized: Any) -> torch.Tensor:
        with torch.no_grad():
            out = model(**tokenized, output_hidden_states=True, return_dict=True)
        hs = torch.stack(out.hidden_states[:-1])[:, :, -1, :]  # (layers, batch, hidden): last token
        return hs.sum(dim=1) / hs.shape[1]
    return run


def gate_vectors(src: Any) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(routers (layers, experts, hidden), shared gates (layers, 1, hidden)), float32."""
    import torch

    spec = src.spec
    layers = len(src.layers)
    hidden = src.tensors()[f"{src.layers[0][1]}mlp.gate.weight"].shape[1]
    n = len(spec.experts) + (1 if spec.shared else 0)
    if spec.gate == "random":
        g = torch.Generator().manual_seed(spec.seed)
        vecs = torch.randn((layers, n, hidden), generator=g)
    else:
        if src.base.folder is None:
            raise RuntimeError(f"gate = \"{spec.gate}\" needs the base as a model folder (its tokenizer)")
        tok = _tokenizer(src.base.folder)
        run = _cheap_embed(src, tok, layers) if spec.gate == "cheap_embed" else _hidden(src)
        lists = list(zip(spec.prompts, spec.negative))
        if spec.shared:
            lists.append((spec.shared_prompts, ()))
        out = []
        for pos, neg in lists:
            hs = run(_tokenize(tok, pos)).float()
            if neg:
                hs = hs - run(_tokenize(tok, neg)).float()
            out.append(hs / hs.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
        vecs = torch.stack(out, dim=0).permute(1, 0, 2)
    e = len(spec.experts)
    return vecs[:, :e, :], vecs[:, e:, :]
