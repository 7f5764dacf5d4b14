"""The ablation's report: accuracy per variant and task over seeds, paired comparisons, routing
specialisation, the claims' verdicts; ``report.json``, ``report.md``, ``accuracy.png``, ``routing.png``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..modalities import media_names, token_groups
from . import suite
from .stats import normalized_mutual_information, own_expert_share, paired_comparison, verdict
from .variants import VariantSpec

MEDIA = media_names()
MEDIA_ROWS = [token_groups().index(m) for m in MEDIA]


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _routing_summary(runs: list[dict]) -> dict[str, Any] | None:
    """NMI per layer (media tokens; all tokens) and own-expert shares, per seed and on average."""
    runs = [r for r in runs if "routing" in r]
    if not runs:
        return None
    layers = runs[0]["routing"]["layers"]
    experts = runs[0]["routing"]["experts"]
    media_nmi, all_nmi, shares = [], [], []
    summed = np.zeros_like(np.asarray(runs[0]["routing"]["first_choice_counts"]))
    for run in runs:
        counts = np.asarray(run["routing"]["first_choice_counts"])  # [layers, groups, experts]
        summed = summed + counts
        media_nmi.append([normalized_mutual_information(c[MEDIA_ROWS]) for c in counts])
        all_nmi.append([normalized_mutual_information(c) for c in counts])
        shares.append([own_expert_share(c[MEDIA_ROWS], MEDIA, experts) for c in counts])
    own: dict[str, float | None] = {}
    for m in MEDIA:
        values = [layer[m] for seed in shares for layer in seed if layer[m] is not None]
        own[m] = float(np.mean(values)) if values else None
    known = [v for v in own.values() if v is not None]
    return {
        "layers": layers,
        "experts": experts,
        "nmi_media": {"per_seed": media_nmi, "per_layer_mean": np.mean(media_nmi, 0).tolist()},
        "nmi_all_tokens": {"per_seed": all_nmi, "per_layer_mean": np.mean(all_nmi, 0).tolist()},
        "own_expert_share": own,
        "own_expert_share_mean": float(np.mean(known)) if known else None,
        "first_choice_counts_over_seeds": summed.tolist(),
    }


def _paired_accuracy(by_variant: dict[str, dict[int, dict]], a: str, b: str, samples: int) -> dict | None:
    if a not in by_variant or b not in by_variant:
        return None
    pairs = [
        (run["tasks"][task]["accuracy"], by_variant[b][seed]["tasks"][task]["accuracy"])
        for seed, run in sorted(by_variant[a].items())
        if seed in by_variant[b]
        for task in sorted(run["tasks"])
    ]
    if not pairs:
        return None
    return paired_comparison([x for x, _ in pairs], [y for _, y in pairs], samples)


def _claims(by_variant: dict, routing: dict, samples: int) -> dict[str, dict]:
    claims: dict[str, dict] = {}
    for key, other in (("a", "dense"), ("b", "generic-moe")):
        comparison = _paired_accuracy(by_variant, "uni-moe", other, samples)
        claims[key] = {
            "statement": suite.CLAIMS[key],
            "measure": f"accuracy, uni-moe minus {other}, over (task, seed) pairs",
            "comparison": comparison,
            "verdict": verdict(comparison) if comparison else "not run",
        }
    c: dict[str, Any] = {
        "statement": suite.CLAIMS["c"],
        "measure": "media-token NMI, uni-moe minus generic-moe, over (seed, MoE layer) pairs; "
        f"uni-moe's mean own-expert share above {suite.OWN_SHARE_THRESHOLD}",
        "comparison": None,
        "verdict": "not run",
    }
    ours, generic = routing.get("uni-moe"), routing.get("generic-moe")
    if ours and generic:
        a = np.ravel(ours["nmi_media"]["per_seed"])
        b = np.ravel(generic["nmi_media"]["per_seed"])
        n = min(len(a), len(b))
        comparison = paired_comparison(a[:n], b[:n], samples)
        share = ours["own_expert_share_mean"]
        c["comparison"] = comparison
        c["own_expert_share_mean"] = share
        c["verdict"] = verdict(comparison)
        if c["verdict"] == "held" and (share is None or share <= suite.OWN_SHARE_THRESHOLD):
            c["verdict"] = "not shown"
    claims["c"] = c
    return claims


def build_report(
    results: list[dict],
    variants: list[VariantSpec],
    settings: dict[str, Any],
    invocations: list[dict],
) -> dict[str, Any]:
    """The report (see the module docstring) from the per-(variant, seed) results of the runner and
    its ``invocations`` (one entry per run of it in this folder, with wall and stage-0 seconds)."""
    samples = int(settings.get("bootstrap_samples", suite.BOOTSTRAP_SAMPLES))
    by_variant: dict[str, dict[int, dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    first = results[0]["tasks"]
    tasks = sorted(first)
    out_variants: dict[str, Any] = {}
    routing: dict[str, Any] = {}
    for spec in variants:
        runs = [by_variant[spec.name][s] for s in sorted(by_variant.get(spec.name, {}))]
        if not runs:
            continue
        accuracy = {
            t: {
                **_mean_std([r["tasks"][t]["accuracy"] for r in runs]),
                "per_seed": [r["tasks"][t]["accuracy"] for r in runs],
            }
            for t in tasks
        }
        per_seed_mean = [float(np.mean([r["tasks"][t]["accuracy"] for t in tasks])) for r in runs]
        entry = {
            "spec": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()},
            "seeds": [r["seed"] for r in runs],
            "accuracy": accuracy,
            "mean_accuracy": {**_mean_std(per_seed_mean), "per_seed": per_seed_mean},
            "control_accuracy": {
                t: float(np.mean([r["tasks"][t]["control_accuracy"] for r in runs])) for t in tasks
            },
            "parameters": runs[0]["parameters"],
            "train_samples": runs[0]["train"]["samples"],
            "train_wall_seconds": _mean_std([r["train"]["wall_seconds"] for r in runs]),
            "vs_dense": _paired_accuracy(by_variant, spec.name, "dense", samples)
            if spec.name != "dense"
            else None,
        }
        summary = _routing_summary(runs)
        if summary:
            entry["routing"] = routing[spec.name] = summary
        out_variants[spec.name] = entry
    claims = _claims(by_variant, routing, samples)
    wall_seconds = round(sum(i["wall_seconds"] for i in invocations), 1)
    return {
        "summary": {  # the headline numbers: mean accuracy, each variant minus dense, the verdicts
            "mean_accuracy": {n: v["mean_accuracy"]["mean"] for n, v in out_variants.items()},
            "minus_dense": {
                n: v["vs_dense"]["mean_difference"] for n, v in out_variants.items() if v["vs_dense"]
            },
            "claims": {k: c["verdict"] for k, c in claims.items()},
            "wall_minutes": round(wall_seconds / 60, 1),
        },
        "preregistration_commit": suite.PREREGISTRATION_COMMIT,
        "claims": claims,
        "variants": out_variants,
        "tasks": {t: {"chance": first[t]["chance"], "heldout": first[t]["n"]} for t in tasks},
        "seeds": sorted({r["seed"] for r in results}),
        "wall_seconds": wall_seconds,
        "stage0_seconds": round(sum(i["stage0_seconds"] for i in invocations), 1),
        "invocations": invocations,
        "settings": settings,
    }


def _pm(cell: dict) -> str:
    return f"{cell['mean']:.3f} ± {cell['std']:.3f}"


def _interval(c: dict | None) -> str:
    if not c:
        return "-"
    low, high = c["ci95"]
    return (
        f"{c['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}], {c['wins']}/{c['losses']}/{c['ties']}, "
        f"p={c['sign_test_p']:.3g}"
    )


def markdown(report: dict[str, Any]) -> str:
    """``report.md``: the tables and verdicts of ``report``."""
    variants = report["variants"]
    names = list(variants)
    tasks = list(report["tasks"])
    lines = [
        "# Ablation: dense vs generic MoE vs Uni-MoE",
        "",
        f"Seeds {report['seeds']}; wall time {report['wall_seconds'] / 60:.1f} min on "
        f"{len(report['invocations'])} run(s) (stage 0 {report['stage0_seconds']:.0f} s). Pre-registration commit: "
        f"`{report['preregistration_commit'] or 'none recorded'}`.",
        "",
        "## Held-out accuracy (mean ± std over seeds)",
        "",
        "| task | chance | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for t in tasks:
        cells = [_pm(variants[n]["accuracy"][t]) for n in names]
        lines.append(f"| {t} | {report['tasks'][t]['chance']:.3f} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean** | | " + " | ".join(f"**{_pm(variants[n]['mean_accuracy'])}**" for n in names) + " |"
    )
    lines += [
        "",
        "Active language-model parameters per token: "
        + ", ".join(f"{n} {variants[n]['parameters']['active_per_token']:,}" for n in names)
        + ". Training samples after stage 1: "
        + ", ".join(f"{n} {variants[n]['train_samples']:,}" for n in names)
        + ".",
        "",
        "## Against dense (difference [bootstrap 95%], wins/losses/ties over task x seed, sign test)",
        "",
        "| variant | accuracy minus dense |",
        "|---|---|",
    ]
    lines += [f"| {n} | {_interval(variants[n]['vs_dense'])} |" for n in names if n != "dense"]
    lines += ["", "## Routing specialisation (first choice, held-out tokens)", ""]
    lines += [
        "| variant | NMI media, per MoE layer | NMI all tokens | own-expert share " + " / ".join(MEDIA) + " |"
    ]
    lines += ["|---|---|---|---|"]
    for n in names:
        r = variants[n].get("routing")
        if not r:
            continue
        own = r["own_expert_share"]
        shares = " / ".join("-" if own[m] is None else f"{own[m]:.2f}" for m in MEDIA)
        lines.append(
            f"| {n} | {', '.join(f'{v:.3f}' for v in r['nmi_media']['per_layer_mean'])} | "
            f"{', '.join(f'{v:.3f}' for v in r['nmi_all_tokens']['per_layer_mean'])} | {shares} |"
        )
    lines += ["", "## Claims", ""]
    for key, claim in report["claims"].items():
        lines.append(
            f"- **({key}) {claim['verdict']}.** {claim['statement']} Measure: {claim['measure']}: "
            f"{_interval(claim['comparison'])}."
        )
    lines += ["", "Figures: `accuracy.png`, `routing.png`.", ""]
    return "\n".join(lines)


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: accuracy per task and variant with the standard deviation over seeds, and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    tasks = [*report["tasks"], "mean"]
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(tasks) + 2, 3.6))
    for i, (name, v) in enumerate(variants.items()):
        cells = [*(v["accuracy"][t] for t in report["tasks"]), v["mean_accuracy"]]
        x = np.arange(len(tasks)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, [c["mean"] for c in cells], width, yerr=[c["std"] for c in cells], label=name, capsize=2)
    for j, t in enumerate(report["tasks"]):
        ax.hlines(report["tasks"][t]["chance"], j - 0.4, j + 0.4, colors="k", linestyles=":", lw=1)
    ax.set_xticks(np.arange(len(tasks)), [t.replace("_", "\n", 1) for t in tasks], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Accuracy per task (mean ± std over seeds; dotted: chance)")
    ax.legend(fontsize=8, ncol=len(variants), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_specialisation(report: dict[str, Any], path: Path) -> None:
    """One row per MoE variant: first-choice heat maps per MoE layer (media tokens, summed over seeds),
    then NMI per layer and the own-expert share per modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: v["routing"] for n, v in report["variants"].items() if v.get("routing")}
    if not rows:
        return
    layers = len(next(iter(rows.values()))["layers"])
    fig, axes = plt.subplots(
        len(rows), layers + 1, figsize=(3.3 * (layers + 1), 2.6 * len(rows)), squeeze=False
    )
    for row, (name, r) in zip(axes, rows.items()):
        counts = np.asarray(r["first_choice_counts_over_seeds"])[:, MEDIA_ROWS]  # [layers, media, experts]
        shares = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
        for i in range(layers):
            ax = row[i]
            ax.imshow(shares[i], vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_title(f"{name}: layer {r['layers'][i]}", fontsize=9)
            ax.set_xticks(range(len(r["experts"])), r["experts"], rotation=45, fontsize=7)
            ax.set_yticks(range(len(MEDIA)), MEDIA if i == 0 else [], fontsize=8)
            for (a, b), v in np.ndenumerate(shares[i]):
                ax.text(b, a, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=6)
        ax = row[-1]
        nmi = r["nmi_media"]["per_layer_mean"]
        own = [r["own_expert_share"][m] for m in MEDIA]
        ax.bar(np.arange(len(nmi)), nmi, color="C0", label="NMI (per layer)")
        if any(v is not None for v in own):
            x = len(nmi) + 0.5 + np.arange(len(MEDIA))
            ax.bar(x, [v or 0 for v in own], color="C1", label="own-expert share")
            ax.set_xticks(
                [*range(len(nmi)), *x],
                [f"L{layer}" for layer in r["layers"]] + list(MEDIA),
                rotation=45,
                fontsize=7,
            )
        else:
            ax.set_xticks(range(len(nmi)), [f"L{layer}" for layer in r["layers"]], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title("specialisation", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out: Path,
    results: list[dict],
    variants: list[VariantSpec],
    settings: dict[str, Any],
    invocations: list[dict],
) -> dict[str, Any]:
    """Builds the report and writes ``report.json``, ``report.md``, ``accuracy.png`` and ``routing.png``."""
    report = build_report(results, variants, settings, invocations)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot_accuracy(report, out / "accuracy.png")
    plot_specialisation(report, out / "routing.png")
    return report
