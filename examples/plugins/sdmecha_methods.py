"""Merge methods written in Python for mergelang (docs/language.md, "Methods in Python").

Loaded by `import "sdmecha_methods.py"` in a recipe, with `--allow-plugins` (this file runs with
your permissions). Two are sd-mecha's formulas, which mergelang's standard library lacks; each
declares its signature with annotations, so `mergelang check` checks calls from the headers.
"""

import torch

import mergelang


@mergelang.method
def add_perpendicular(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """sd-mecha's add_perpendicular: a + alpha * the part of (b - c) perpendicular to (a - c)
    (whole tensor; zero where a - c is zero)."""
    da, db = a - c, b - c
    nn = torch.sum(da * da)
    if nn == 0:
        return a.clone()
    return a + alpha * (db - da * (torch.sum(da * db) / nn))


@mergelang.method(elementwise=True)
def geometric_sum(a: torch.Tensor, b: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """sd-mecha's geometric_sum: |a|^(1 - alpha) |b|^alpha with a's sign where the signs agree,
    0 where they differ (elementwise, so it streams in row chunks under a memory budget)."""
    same = torch.sign(a) == torch.sign(b)
    mag = torch.abs(a) ** (1 - alpha) * torch.abs(b) ** alpha
    return torch.where(same, torch.sign(a) * mag, torch.zeros_like(a))


@mergelang.method
def crossover(a: torch.Tensor, b: torch.Tensor, cutoff: float = 0.5) -> torch.Tensor:
    """Frequency crossover: the low frequencies of a and the high ones of b (an FFT over the
    whole tensor; a frequency is low when its normalised radius is below `cutoff`)."""
    if a.dim() == 0:
        return a.clone()
    fa, fb = torch.fft.fftn(a), torch.fft.fftn(b)
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, device=a.device) for n in a.shape], indexing="ij")
    radius = torch.sqrt(sum(g * g for g in grids)) / (0.5 * len(a.shape) ** 0.5)
    return torch.fft.ifftn(torch.where(radius < cutoff, fa, fb)).real
