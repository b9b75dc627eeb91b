"""Scaling-law fits: IsoFLOP minima and the Chinchilla parametric law, with bootstrap intervals.

Two of Hoffmann et al. (2022)'s three approaches, on (N, D, C, loss) of finished runs:
- IsoFLOP profiles (their approach 2): per compute budget, a parabola of loss in log N; its vertex
  is the compute-optimal N, and power laws N_opt ~ C^a, D_opt ~ C^b across budgets.
- The parametric law (approach 3): L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising
  the Huber loss (delta 1e-3) between log L and its prediction, written as a log-sum-exp of
  (a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, using L-BFGS started from
  their grid of initialisations. We run L-BFGS from the grid points with the lowest objective
  rather than all 4,500 (the rest converge to the same minima and cost 100x the time).
Intervals are percentiles over bootstrap resamples of the runs (Besiroglu et al. 2024 showed the
published Chinchilla intervals were far too narrow without one). Pure numpy and scipy: no JAX.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy import optimize, special
from threadpoolctl import threadpool_limits

from tokensynth_jax.errors import UserError

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
# Hoffmann et al.'s initialisation grid (their appendix D.2), in (a, b, e, alpha, beta).
INIT_GRID = np.array(list(itertools.product(
    np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 1.5, 0.5), np.arange(0, 2.5, 0.5),
    np.arange(0, 2.5, 0.5))))


class FitError(UserError):
    """Too few or unusable points for a fit; the message says what is missing."""


# --- the parametric law ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LawFit:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss at the optimum

    def predict(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, c, flops_per_param_token: float = 6.0):
        """(N_opt, D_opt) minimising L under C = k N D (k = 6: Hoffmann et al.'s eq. 4)."""
        c = np.asarray(c, float) / flops_per_param_token
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        return g * c**a, c**b / g

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        total = self.alpha + self.beta
        out["n_opt_exponent"] = self.beta / total if total > 0 else float("nan")  # N_opt ~ C^a
        out["d_opt_exponent"] = self.alpha / total if total > 0 else float("nan")  # D_opt ~ C^b
        return out


def _objective(theta, log_n, log_d, log_l, delta):
    """Summed Huber loss of the log-sum-exp prediction, and its gradient in theta."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    pred = special.logsumexp(terms, axis=0)
    r = pred - log_l
    w = np.exp(terms - pred)  # d pred / d terms (softmax weights)
    dr = np.clip(r, -delta, delta)  # Huber'(r)
    grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
                     -(dr * w[0] * log_n).sum(), -(dr * w[1] * log_d).sum()])
    return special.huber(delta, r).sum(), grad


def _grid_objective(grid, log_n, log_d, log_l, delta):
    """Objective of every initialisation at once (vectorised: [inits, points])."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    pred = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
    return special.huber(delta, pred - log_l).sum(axis=1)


def fit_law(n, d, loss, *, delta: float = 1e-3, starts: int = 64, extra_inits=()) -> LawFit:
    """Fits L(N, D) = E + A/N^alpha + B/D^beta to runs (Huber on log L, L-BFGS from a grid).

    Args:
      n, d, loss: parameters, training tokens and final loss of each run (equal lengths).
      delta: the Huber threshold (1e-3 as Hoffmann et al.).
      starts: L-BFGS runs, from the grid points with the lowest objective.
      extra_inits: further (a, b, e, alpha, beta) starts, e.g. a previous fit for bootstraps.
    """
    log_n, log_d, log_l = (np.log(np.asarray(x, float)) for x in (n, d, loss))
    if not (len(log_n) == len(log_d) == len(log_l)):
        raise FitError("n, d and loss differ in length")
    if len(log_l) < len(PARAM_NAMES) + 1:
        raise FitError(f"the parametric law has 5 constants: it needs at least 6 runs, got {len(log_l)}")
    if not np.all(np.isfinite(log_n + log_d + log_l)):
        raise FitError("non-positive or non-finite N, D or loss")
    order = np.argsort(_grid_objective(INIT_GRID, log_n, log_d, log_l, delta))
    inits = [*INIT_GRID[order[:starts]], *np.atleast_2d(np.asarray(extra_inits, float)).reshape(-1, 5)]
    best = None
    # One BLAS thread: L-BFGS-B's 5x5 updates are 20x slower with OpenBLAS threads on a busy machine.
    with threadpool_limits(limits=1, user_api="blas"):
        for x0 in inits:
            res = optimize.minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B")
            if best is None or res.fun < best.fun:
                best = res
    a, b, e, alpha, beta = best.x
    return LawFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                  beta=float(beta), objective=float(best.fun))


def law_theta(fit: LawFit) -> np.ndarray:
    """A fit as an (a, b, e, alpha, beta) start for `fit_law(extra_inits=...)`."""
    return np.array([np.log(fit.A), np.log(fit.B), np.log(fit.E), fit.alpha, fit.beta])


# --- IsoFLOP profiles --------------------------------------------------------------------------
def isoflop_minimum(n, loss) -> dict:
    """Vertex of the parabola loss = p2 (log N)^2 + p1 log N + p0 through one budget's runs.

    Returns {"n_opt", "loss_opt", "coeffs"}; n_opt is None when the profile has no minimum
    (p2 <= 0: the sizes do not bracket the optimum) or it lies outside the sizes tried.
    """
    log_n, loss = np.log(np.asarray(n, float)), np.asarray(loss, float)
    if len(np.unique(log_n)) < 3:
        raise FitError(f"a parabola needs 3 sizes per budget, got {len(np.unique(log_n))}")
    p2, p1, p0 = np.polyfit(log_n, loss, 2)
    out = {"coeffs": [float(p2), float(p1), float(p0)], "n_opt": None, "loss_opt": None}
    if p2 > 0:
        x = -p1 / (2 * p2)
        if log_n.min() <= x <= log_n.max():
            out.update(n_opt=float(np.exp(x)), loss_opt=float(np.polyval([p2, p1, p0], x)))
        else:
            out["why"] = "the minimum lies outside the sizes tried"
    else:
        out["why"] = "the profile is not convex: the sizes do not bracket the optimum"
    return out


def power_law(c, y) -> dict:
    """y = k C^exponent by least squares in log-log; needs 2 budgets."""
    c, y = np.asarray(c, float), np.asarray(y, float)
    if len(c) < 2:
        raise FitError(f"a power law in C needs 2 budgets with a minimum, got {len(c)}")
    exponent, log_k = np.polyfit(np.log(c), np.log(y), 1)
    return {"exponent": float(exponent), "coefficient": float(np.exp(log_k))}


def isoflop_fit(runs: list[dict]) -> dict:
    """IsoFLOP minima per budget and the power laws of N_opt and D_opt in C.

    Args:
      runs: dicts with "budget", "params", "flops_per_token", "flops" and "loss".
    Returns:
      {"budgets": [{budget, n_opt, d_opt, ...}], "n_opt": power law or None, "d_opt": ...}
    """
    out = {"budgets": [], "n_opt": None, "d_opt": None}
    for budget in sorted({r["budget"] for r in runs}):
        group = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["params"])
        entry = {"budget": budget, "runs": len(group)}
        try:
            entry.update(isoflop_minimum([r["params"] for r in group], [r["loss"] for r in group]))
        except FitError as e:
            entry.update(n_opt=None, why=str(e))
        if entry.get("n_opt"):
            # D_opt = C / F(N_opt): F per token interpolated between the sizes in log space.
            log_f = np.interp(np.log(entry["n_opt"]), np.log([r["params"] for r in group]),
                              np.log([r["flops_per_token"] for r in group]))
            entry["d_opt"] = float(budget / np.exp(log_f))
        out["budgets"].append(entry)
    found = [b for b in out["budgets"] if b.get("n_opt")]
    if len(found) >= 2:
        out["n_opt"] = power_law([b["budget"] for b in found], [b["n_opt"] for b in found])
        out["d_opt"] = power_law([b["budget"] for b in found], [b["d_opt"] for b in found])
    else:
        out["why"] = f"power laws need minima at 2 budgets, found {len(found)}"
    return out


# --- bootstrap ---------------------------------------------------------------------------------
def _interval(samples, level):
    samples = np.asarray([s for s in samples if s is not None and np.isfinite(s)], float)
    if not len(samples):
        return None
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def bootstrap(runs: list[dict], law: LawFit | None, *, samples: int = 200, level: float = 0.9,
              seed: int = 0, delta: float = 1e-3) -> dict:
    """Percentile intervals of the fitted constants over resamples of the runs.

    Runs are resampled with replacement within each budget, so every resample keeps the
    IsoFLOP design. The law refits start from the full fit and the 8 best grid points.
    """
    rng = np.random.default_rng(seed)
    budgets = sorted({r["budget"] for r in runs})
    draws = {k: [] for k in (*PARAM_NAMES, "n_opt_exponent", "d_opt_exponent", "isoflop_n_exponent",
                             "isoflop_d_exponent")}
    per_budget = {b: [] for b in budgets}
    for _ in range(samples):
        resample = []
        for b in budgets:
            group = [r for r in runs if r["budget"] == b]
            resample += [group[i] for i in rng.integers(0, len(group), len(group))]
        iso = isoflop_fit(resample)
        for entry in iso["budgets"]:
            per_budget[entry["budget"]].append(entry.get("n_opt"))
        draws["isoflop_n_exponent"].append(iso["n_opt"]["exponent"] if iso["n_opt"] else None)
        draws["isoflop_d_exponent"].append(iso["d_opt"]["exponent"] if iso["d_opt"] else None)
        if law is not None:
            try:
                fit = fit_law([r["params"] for r in resample], [r["tokens"] for r in resample],
                              [r["loss"] for r in resample], delta=delta, starts=8, extra_inits=[law_theta(law)])
            except FitError:
                continue
            for k, v in fit.to_dict().items():
                if k in draws:
                    draws[k].append(v)
    out = {"samples": samples, "level": level, "seed": seed,
           "intervals": {k: _interval(v, level) for k, v in draws.items()},
           "isoflop_n_opt": {str(b): _interval(v, level) for b, v in per_budget.items()}}
    return out
