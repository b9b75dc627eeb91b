"""PNG plots of a sweep fit (matplotlib, Agg canvas through `Figure`, no pyplot global state).

- loss_vs_compute.png: every run's training curve against FLOPs, coloured by size, final losses
  marked, the lower envelope (the compute frontier) and, with a parametric fit, its
  compute-optimal loss L(N_opt(C), D_opt(C)).
- isoflop.png: loss against N per budget with the fitted parabolas and their minima; beside
  it N_opt and D_opt against C with the fitted power laws.
- fit_vs_observed.png: the parametric law's predicted loss against the observed final loss.
"""
from __future__ import annotations

import os

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter


def _colours(values):
    values = sorted(set(values))
    return {v: colormaps["viridis"](i / max(len(values) - 1, 1)) for i, v in enumerate(values)}


def loss_vs_compute(result: dict, law, path: str) -> None:
    runs = result["runs"]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    colours = _colours(r["params"] for r in runs)
    for r in sorted(runs, key=lambda r: r["params"]):
        c, l = np.array(r["curve"]).T if r["curve"] else (np.array([]), np.array([]))
        ax.plot(c, l, color=colours[r["params"]], alpha=0.6, lw=1)
    for n, colour in colours.items():
        ax.plot([], [], color=colour, label=f"N = {n:.3g}")
    sources = "/".join(sorted({r["loss_source"] for r in runs}))
    ax.scatter([r["flops"] for r in runs], [r["loss"] for r in runs], c=[colours[r["params"]] for r in runs],
               edgecolors="k", zorder=3, s=25, label=f"final loss ({sources}); lines: training loss")
    if result["frontier"]:
        fc, fl, _ = zip(*result["frontier"])
        ax.step(fc, fl, where="post", color="k", lw=1.5, label="frontier (envelope)")
    if law is not None:
        c = np.logspace(np.log10(min(r["flops"] for r in runs)), np.log10(max(r["flops"] for r in runs)), 50)
        n, d = law.compute_optimal(c)
        ax.plot(c, law.predict(n, d), "r--", label="L(N_opt, D_opt), parametric fit")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="loss (cross-entropy)", title="Loss vs compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def isoflop(result: dict, path: str) -> None:
    runs, iso = result["runs"], result["isoflop"]
    fig = Figure(figsize=(11, 4.5))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = _colours(r["budget"] for r in runs)
    for entry in iso["budgets"]:
        b = entry["budget"]
        group = sorted((r for r in runs if r["budget"] == b), key=lambda r: r["params"])
        n = np.array([r["params"] for r in group])
        ax.scatter(n, [r["loss"] for r in group], color=colours[b], label=f"C = {b:.2g}", zorder=3)
        if "coeffs" in entry:
            x = np.linspace(np.log(n.min()), np.log(n.max()), 50)
            ax.plot(np.exp(x), np.polyval(entry["coeffs"], x), color=colours[b])
        if entry.get("n_opt"):
            ax.plot(entry["n_opt"], entry["loss_opt"], "*", color=colours[b], ms=12, mec="k")
    ax.set(xscale="log", xlabel="non-embedding parameters N", ylabel="final loss", title="IsoFLOP profiles")
    ax.xaxis.set_minor_formatter(NullFormatter())  # a decade or less of N: minor labels would overlap
    ax.legend(fontsize=7)
    found = [e for e in iso["budgets"] if e.get("n_opt")]
    if found:
        c = np.array([e["budget"] for e in found])
        ax2.scatter(c, [e["n_opt"] for e in found], label="N_opt (IsoFLOP minima)")
        ax2.scatter(c, [e["d_opt"] for e in found], marker="s", label="D_opt")
        for key, style in (("n_opt", "C0-"), ("d_opt", "C1-")):
            if iso.get(key):
                law = iso[key]
                ax2.plot(c, law["coefficient"] * c ** law["exponent"], style,
                         label=f"{key} ~ C^{law['exponent']:.2f}")
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "no IsoFLOP minimum within the sizes tried", ha="center", transform=ax2.transAxes)
    ax2.set(xscale="log", yscale="log", xlabel="training FLOPs C", title="Compute-optimal N and D")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fit_vs_observed(result: dict, path: str) -> None:
    runs = [r for r in result["runs"] if "predicted" in r]
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.add_subplot()
    if runs:
        obs, pred = [r["loss"] for r in runs], [r["predicted"] for r in runs]
        colours = _colours(r["budget"] for r in runs)
        ax.scatter(obs, pred, c=[colours[r["budget"]] for r in runs], edgecolors="k")
        lo, hi = min(obs + pred), max(obs + pred)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        law = result["law"]
        ax.set_title(f"L = {law['E']:.3g} + {law['A']:.3g}/N^{law['alpha']:.3g} + {law['B']:.3g}/D^{law['beta']:.3g}",
                     fontsize=8)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, result["law"].get("why", "no parametric fit"), ha="center", wrap=True, transform=ax.transAxes)
    ax.set(xlabel="observed final loss", ylabel="fitted L(N, D)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_all(result: dict, law, out_dir: str) -> list[str]:
    """Writes the three plots into `out_dir`; returns their paths."""
    paths = [os.path.join(out_dir, n) for n in ("loss_vs_compute.png", "isoflop.png", "fit_vs_observed.png")]
    loss_vs_compute(result, law, paths[0])
    isoflop(result, paths[1])
    fit_vs_observed(result, paths[2])
    return paths
