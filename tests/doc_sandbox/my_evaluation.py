"""Stand-ins for a user's evaluation code, on the sandbox's tiny Llama-shaped models (vocab 128):
a "model" here scores token pairs with its embedding and lm_head only."""

import torch

PAIRS = torch.tensor([[i, (i * 7 + 3) % 128] for i in range(64)])  # (input token, next token)


def logits(state, task, x):
    """Next-token logits of tokens `x` from the merged embedding and lm_head (differentiable)."""
    return state["model.embed_tokens.weight"][x] @ state["lm_head.weight"].T


def evaluate_on_validation(state):
    """Mean log-probability of the next token of each pair: higher is better."""
    with torch.no_grad():
        lp = torch.log_softmax(logits(state, "val", PAIRS[:, 0]), dim=-1)
    return float(lp.gather(1, PAIRS[:, 1:]).mean())


batches = [{"math": PAIRS[:32, 0], "code": PAIRS[32:, 0]} for _ in range(4)]
