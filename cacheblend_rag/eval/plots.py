"""PNG plots of eval and sweep results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'cacheblend-rag[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(result: dict, out_dir: Path, prefix: str = "") -> list[Path]:
    """Write the plots a results JSON supports (eval and/or sweep); return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if "summary" in result and result["summary"] and "top1_agreement" in result["summary"][0]:
        paths += _eval_plots(result, out_dir, prefix)
    if "ttft_vs_chunks" in result:
        paths += _sweep_plots(result, out_dir, prefix)
    if not paths:
        raise ValueError("nothing to plot: expected the JSON of `cacheblend eval` or `cacheblend bench sweep`")
    return paths


def _blend_series(summary: list[dict]) -> dict[str, list[dict]]:
    """cacheblend summary rows by token selection (older results have none: the paper's deviation)."""
    series: dict[str, list[dict]] = {}
    for row in summary:
        if row["strategy"] == "cacheblend":
            selection = row.get("selection") or "deviation"
            target = " target" if row.get("fidelity_target") is not None else ""
            series.setdefault(f"cacheblend ({selection}){target}", []).append(row)
    return {label: sorted(rows, key=lambda s: s["recompute_ratio"]) for label, rows in series.items()}


def _eval_plots(result: dict, out_dir: Path, prefix: str) -> list[Path]:
    plt = _pyplot()
    summary = result["summary"]
    series = _blend_series(summary)
    refs = {s["strategy"]: s for s in summary if s["strategy"] in ("full_reuse", "full_recompute")}
    if not series:
        raise ValueError("the eval results hold no cacheblend ratios to plot against")
    panels = [
        ("top1_agreement", "top-1 agreement with full recompute"),
        ("kl", "KL(full || strategy)"),
        ("gold_f1", "gold F1"),
        ("answer_em_vs_full", "answer exact match with full recompute"),
    ]
    panels = [(key, title) for key, title in panels if all(s[key] is not None for s in summary)]  # no gold: no F1
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        for label, blend in series.items():
            ax.plot([s["recompute_ratio"] for s in blend], [s[key] for s in blend], "o-", label=label)
        for name, style in (("full_recompute", "--"), ("full_reuse", ":")):
            if name in refs:
                ax.axhline(
                    refs[name][key], linestyle=style, color="gray" if name == "full_reuse" else "black", label=name
                )
        ax.set_xlabel("recompute ratio")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Quality vs recompute ratio ({result['config'].get('model')}, n={result['config'].get('n')})")
    fig.tight_layout()
    quality = out_dir / f"{prefix}quality_vs_ratio.png"
    fig.savefig(quality, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, blend in series.items():
        ax.plot([s["recompute_ratio"] for s in blend], [s["median_ttft_s"] for s in blend], "o-", label=label)
    for name, style in (("full_recompute", "--"), ("full_reuse", ":")):
        if name in refs:
            ax.axhline(refs[name]["median_ttft_s"], linestyle=style, color="black", label=name)
    ax.set_xlabel("recompute ratio")
    ax.set_ylabel("median TTFT (s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("TTFT vs recompute ratio")
    fig.tight_layout()
    ttft = out_dir / f"{prefix}ttft_vs_ratio.png"
    fig.savefig(ttft, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    for label, blend in series.items():
        points = sorted((s["median_ttft_s"], s["kl"]) for s in blend)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    for name, marker in (("full_recompute", "s"), ("full_reuse", "^")):
        if name in refs:
            ax.plot([refs[name]["median_ttft_s"]], [refs[name]["kl"]], marker, color="black", label=name)
    ax.set_xlabel("median TTFT (s)")
    ax.set_ylabel("KL(full || strategy)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Quality vs TTFT")
    fig.tight_layout()
    tradeoff = out_dir / f"{prefix}quality_vs_ttft.png"
    fig.savefig(tradeoff, dpi=110)
    plt.close(fig)
    return [quality, ttft, tradeoff]


def _sweep_plots(result: dict, out_dir: Path, prefix: str) -> list[Path]:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    strategies = sorted({r["strategy"] for r in result["ttft_vs_chunks"]})
    for strategy in strategies:
        rows = [r for r in result["ttft_vs_chunks"] if r["strategy"] == strategy]
        points = sorted((r["chunks"], r["median_ttft_s"]) for r in rows)
        left.plot([p[0] for p in points], [p[1] for p in points], "o-", label=strategy)
    left.set_xlabel("retrieved chunks in the prompt")
    left.set_ylabel("median TTFT (s)")
    left.set_title("TTFT vs number of chunks")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    points = sorted((r["ratio"], r["median_ttft_s"]) for r in result["ttft_vs_ratio"])
    right.plot([p[0] for p in points], [p[1] for p in points], "o-", label="cacheblend")
    right.set_xlabel("recompute ratio")
    right.set_ylabel("median TTFT (s)")
    right.set_ylim(bottom=0)
    right.set_title("cacheblend TTFT vs recompute ratio")
    right.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / f"{prefix}ttft_sweeps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
