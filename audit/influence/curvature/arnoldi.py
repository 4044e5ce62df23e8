"""`arnoldi`: the top eigenpairs of the curvature from Arnoldi iteration on curvature-vector
products (Schioppa et al. 2022, "Scaling Up Influence Functions").

The curvature (Gauss-Newton by default, the true Hessian with curvature="hessian") is that of the
mean loss over `samples` training examples (seeded draw; all by default). Products are matrix-free
(jvp + vjp for Gauss-Newton, forward-over-reverse for the Hessian), so memory is iterations x P.
Stability: Gram-Schmidt is applied twice per step (full reorthogonalisation); when the Krylov
space becomes invariant the iteration continues from a fresh random direction orthogonal to it, so
at rank = iterations = P the result equals `exact`; Gauss-Newton Ritz values below 0 (round-off)
are clipped to 0; the top `rank` are kept by magnitude (so negative Hessian eigenvalues count).
"""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vjp
from torch.utils.data import Dataset, Subset

from audit.errors import NumericalError
from audit.influence.context import Context
from audit.influence.curvature import EigenCurvature

HUTCHINSON_PROBES = 16


def _sample(ctx: Context, data: Dataset, n: int, generator: torch.Generator) -> tuple[Dataset, int]:
    samples = ctx.config.samples
    if samples is None or samples >= n:
        return data, n
    idx = torch.randperm(n, generator=generator)[:samples].sort().values
    return Subset(data, idx.tolist()), samples


def curvature_product(ctx: Context, data: Dataset, m: int):
    """v [P] -> C v [P] (float64) for the mean-loss curvature over `data` (m examples)."""
    space, g = ctx.space, ctx.grads
    cached = list(ctx.batches(data, "arnoldi: load sample", per_example=False))  # reused by every product

    def product(v_flat: torch.Tensor) -> torch.Tensor:
        v = space.unflatten(v_flat.to(ctx.dtype))
        total = torch.zeros(space.dim, dtype=torch.float64, device=ctx.device)
        for inputs, labels in cached:

            def f(p, inputs=inputs):
                return g.forward(p, inputs)

            if ctx.config.curvature == "gn":
                z, jv = jvp(f, (g.selected,), (v,))  # [B, C]
                p = torch.softmax(z, dim=-1)
                u = p * jv - p * (p * jv).sum(-1, keepdim=True)  # (diag(p) - p p^T) J v
                out = vjp(f, g.selected)[1](u)[0]
            else:

                def loss(p, inputs=inputs, labels=labels):
                    return torch.nn.functional.cross_entropy(f(p, inputs), labels, reduction="sum")

                out = jvp(grad(loss), (g.selected,), (v,))[1]
            total += space.flatten({k: t.unsqueeze(0) for k, t in out.items()}, lead=1)[0].to(torch.float64)
        result = total / m
        if not torch.isfinite(result).all():
            raise NumericalError("A curvature-vector product is not finite; check the model's loss for NaN/inf.")
        return result

    return product


def arnoldi_iteration(product, dim: int, iterations: int, generator: torch.Generator, device, progress: bool):
    """Orthonormal Krylov basis Q [iterations, dim] and projected matrix Q C Q^T [iterations, iterations]."""
    from tqdm.auto import tqdm

    def fresh(q_prev: torch.Tensor) -> torch.Tensor:
        r = torch.randn(dim, generator=generator, dtype=torch.float64).to(device)
        for _ in range(2):
            r = r - q_prev.T @ (q_prev @ r)
        return r / r.norm()

    basis = torch.zeros(iterations + 1, dim, dtype=torch.float64, device=device)
    hess = torch.zeros(iterations + 1, iterations, dtype=torch.float64, device=device)
    basis[0] = fresh(basis[:0])
    scale = 0.0
    for j in tqdm(range(iterations), desc="arnoldi: iterations", disable=not progress, leave=False):
        w = product(basis[j])
        for _ in range(2):  # "twice is enough": keeps the basis orthonormal to round-off
            h = basis[: j + 1] @ w
            w = w - basis[: j + 1].T @ h
            hess[: j + 1, j] += h
        beta = w.norm()
        scale = max(scale, hess[: j + 1, j].abs().max().item())
        if j + 1 >= dim:
            break
        if beta.item() <= 1e-10 * max(scale, 1e-300):
            basis[j + 1] = fresh(basis[: j + 1])  # invariant subspace: restart orthogonally
        else:
            hess[j + 1, j] = beta
            basis[j + 1] = w / beta
    projected = hess[:iterations, :iterations]
    return basis[:iterations], (projected + projected.T) / 2


def gn_trace(ctx: Context, data: Dataset, m: int, generator: torch.Generator) -> float:
    """trace of the Gauss-Newton matrix over `data`: 1/m sum_i sum_k |J_i^T v_ik|^2."""
    total = 0.0
    for inputs, labels in ctx.batches(data, "arnoldi: trace"):
        for factors in ctx.gn_factors(inputs, labels, generator):
            total += factors.to(torch.float64).pow(2).sum().item()
    return total / m


def hutchinson_trace(product, dim: int, generator: torch.Generator, device) -> float:
    """Unbiased trace estimate from Rademacher probes (HUTCHINSON_PROBES products)."""
    total = 0.0
    for _ in range(HUTCHINSON_PROBES):
        z = (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(device=device, dtype=torch.float64)
        total += (z @ product(z)).item()
    return total / HUTCHINSON_PROBES


def fit_arnoldi(ctx: Context, data: Dataset, n: int) -> EigenCurvature:
    """Top-`rank` eigenpairs of the sample curvature, and its trace / P for damping=None."""
    cfg, dim = ctx.config, ctx.space.dim
    generator = torch.Generator().manual_seed(cfg.seed)
    iterations = min(dim, cfg.iterations or 2 * cfg.rank)
    rank = min(cfg.rank, iterations)
    sample, m = _sample(ctx, data, n, generator)
    product = curvature_product(ctx, sample, m)
    basis, projected = arnoldi_iteration(product, dim, iterations, generator, ctx.device, ctx.progress)
    values, vectors = torch.linalg.eigh(projected)
    if cfg.curvature == "gn":
        values = values.clamp_min(0.0)
    keep = torch.argsort(values.abs(), descending=True)[:rank]
    if cfg.curvature == "gn":
        trace = gn_trace(ctx, sample, m, generator)
    else:
        trace = hutchinson_trace(product, dim, generator, ctx.device)
    return EigenCurvature(values[keep], basis.T @ vectors[:, keep], trace / dim)
