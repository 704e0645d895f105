"""The evaluation report: Table 3, Fig. 6, Fig. 7 and the ROC curves as JSON, CSV and PNG files.

    evaluation = wff.client.evaluate.evaluate(records, url="localhost:8001")
    write_report(evaluation, "runs/report")
    write_ablation({"N=4": json.load(...), "N=8": ..., "N=16": ...}, "runs/ablation")

Every number comes from the per-patient components the server returned
(:class:`wff.client.evaluate.Evaluation`, wff.ensemble.report_metrics); this module only lays
them out. Figures use matplotlib's object API on the Agg canvas, imported when a figure is
drawn: no pyplot state, no display needed. Files carry no pixel data; patients.csv names
patients by their dataset folder (patient_id), like ``wff evaluate --csv``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from wff.client.evaluate import CSV_FIELDS, METRICS, Evaluation, json_number
from wff.config import LABELS
from wff.ensemble.metrics import auc
from wff.ensemble.report_metrics import roc_curve, strategy_decisions
from wff.records import LOCATION_SEPARATOR

COUNTS = ("tp", "tn", "fp", "fn")
SUBSET_TITLES = {"T1": "T1 (T1WI) only", "T2": "T2 (T2WI, FS-T2WI) only", "All": "all sequences"}
DPI = 120


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _write_csv(path: Path, fields: Sequence[str], rows: Sequence[Mapping]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:  # "Det-Seq-Age (paper λ)" is not ASCII
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in fields} for row in rows)
    return path


# Text tables for the terminal ------------------------------------------------------------------


def format_per_location(per_location: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Fig. 6 as text: one row per strategy, per location "wrong/patients error rate"; a patient
    with tumours at two locations counts at both."""
    if not per_location:
        return "no diagnoses: no per-location errors"
    locations = list(next(iter(per_location.values())))
    lines = ["Wrong / patients and error rate by vertebral location (a patient counts at each of its locations)",
             f"{'Fusion method':<14}" + "".join(f"{loc:>14}" for loc in locations)]
    for name, rows in per_location.items():
        cells = [f"{r['wrong']}/{r['patients']} {_fmt(r['error_rate'], 2)}" for r in rows.values()]
        lines.append(f"{name:<14}" + "".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def format_sequences(sequences: Mapping[str, Mapping]) -> str:
    """Fig. 7 as text: ACC per strategy (rows) and sequence subset (columns), with patient counts."""
    subsets = list(sequences)
    names = list(dict.fromkeys(n for entry in sequences.values() for n in entry["strategies"]))
    lines = ["ACC by MRI sequence (T2 = T2WI and FS-T2WI/STIR)", f"{'Fusion method':<14}" + "".join(f"{s:>9}" for s in subsets)]
    for name in names:
        lines.append(f"{name:<14}" + "".join(f"{_fmt(sequences[s]['strategies'].get(name, {}).get('acc')):>9}" for s in subsets))
    lines.append(f"{'patients':<14}" + "".join(f"{sequences[s]['patients']:>9}" for s in subsets))
    lines.append(f"{'left out':<14}" + "".join(f"{sequences[s]['left_out']:>9}" for s in subsets) + "   (no series of that sequence)")
    return "\n".join(lines)


def format_ablation(rows: Mapping[str, Mapping]) -> str:
    """The ablation table as text: one block of Table 3 per row label."""
    table = ablation_table(rows)
    lines = [f"{'Run':<10}{'Fusion method':<14}" + "".join(f"{k.upper():>7}" for k in METRICS)]
    for label, strategies in table.items():
        for name, m in strategies.items():
            lines.append(f"{label:<10}{name:<14}" + "".join(f"{_fmt(m.get(k)):>7}" for k in METRICS))
    return "\n".join(lines)


# Figures ----------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # lazy: matplotlib only when a figure is drawn

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _grouped_bars(ax, groups: Sequence[str], series: Mapping[str, Sequence[float]], colours: Sequence, values_on_bars: bool = False) -> None:
    """One bar group per entry of ``groups``, one bar per entry of ``series`` in each group."""
    width = 0.8 / max(len(series), 1)
    for i, ((label, values), colour) in enumerate(zip(series.items(), colours)):
        x = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [0.0 if v is None or math.isnan(v) else v for v in values]
        bars = ax.bar(x, heights, width, label=label, color=colour)
        if values_on_bars:
            ax.bar_label(bars, labels=[_fmt(v, 2) for v in values], fontsize=6, padding=1)
    ax.set_xticks(range(len(groups)), groups)


def per_location_title(per_location: Mapping[str, Mapping[str, Mapping]], patients: int | None = None) -> str:
    """Fig. 6's title: the diagnosed patients (when given) and their tumour locations, the sum of the bars."""
    rows = next(iter(per_location.values()), {})
    located = sum(row["patients"] for row in rows.values())
    who = f"{patients} diagnosed patients with " if patients is not None else ""
    return f"Errors by vertebral location (paper Fig. 6), a patient counted at each of its locations: {who}{located} tumour locations"


def plot_per_location(
    per_location: Mapping[str, Mapping[str, Mapping]], path: Path, served_strategy: str | None = None, patients: int | None = None
) -> Path:
    """Fig. 6: (a) wrong patients, (b) patients and (c) error rate per location, one bar per strategy.

    A patient with tumours at two locations is a bar count at both, so the bars of (b) sum to the
    tumour locations; ``patients`` (the diagnosed patients) goes into the title beside that sum.
    """
    fig = _figure(15, 4.6)
    axes = fig.subplots(1, 3)
    names = list(per_location)
    locations = list(next(iter(per_location.values()))) if names else []
    counts = [per_location[names[0]][loc]["patients"] for loc in locations] if names else []
    ticks = [f"{loc}\nn={n}" for loc, n in zip(locations, counts)]
    legend = {f"{n} (served)" if n == served_strategy else n: n for n in names}
    colours = _colours(len(names))
    _grouped_bars(axes[0], ticks, {label: [per_location[n][loc]["wrong"] for loc in locations] for label, n in legend.items()}, colours)
    axes[0].set(title="(a) Wrong patients by location", xlabel="vertebral location", ylabel="wrongly diagnosed patients")
    axes[1].bar(range(len(locations)), counts, 0.6, color="0.45")
    axes[1].set_xticks(range(len(locations)), ticks)
    axes[1].set(title="(b) Patients by location", xlabel="vertebral location", ylabel="patients")
    _grouped_bars(axes[2], ticks, {label: [per_location[n][loc]["error_rate"] for loc in locations] for label, n in legend.items()}, colours)
    axes[2].set(title="(c) Error rate by location", xlabel="vertebral location", ylabel="error rate (wrong / patients)", ylim=(0, 1))
    from matplotlib.ticker import MaxNLocator

    for ax in axes[:2]:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=7, title="fusion method", title_fontsize=7)
    fig.suptitle(per_location_title(per_location, patients))
    fig.savefig(path)
    return path


def plot_sequences(sequences: Mapping[str, Mapping], path: Path) -> Path:
    """Fig. 7: ACC of every strategy with T1 only, T2 only and all sequences."""
    fig = _figure(10, 4.8)
    ax = fig.subplots()
    names = list(dict.fromkeys(n for entry in sequences.values() for n in entry["strategies"]))
    series = {
        f"{SUBSET_TITLES.get(s, s)} ({entry['patients']} patients, {entry['left_out']} left out)": [
            entry["strategies"].get(n, {}).get("acc", math.nan) for n in names
        ]
        for s, entry in sequences.items()
    }
    _grouped_bars(ax, names, series, _colours(len(series)), values_on_bars=True)
    ax.set(title="ACC with T1, T2 and all sequences (paper Fig. 7)", xlabel="fusion method", ylabel="ACC", ylim=(0, 1.1))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=len(series), frameon=False)
    fig.savefig(path)
    return path


def roc_curves(evaluation: Evaluation) -> dict[str, dict]:
    """Per strategy: fpr, tpr, thresholds (lists) and AUC of the patient scores (Decision.p_malignant).

    Empty when the diagnosed patients are all of one class (the curve is undefined).
    """
    done = evaluation.diagnosed
    labels = [r.label for r in done]
    curves = {}
    for name, decisions in strategy_decisions(evaluation.components(), evaluation.settings).items():
        scores = [d.p_malignant for d in decisions]
        try:
            fpr, tpr, thresholds = roc_curve(labels, scores)
        except ValueError:
            return {}
        curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist(), "auc": auc(labels, scores)}
    return curves


def plot_roc(curves: Mapping[str, Mapping], path: Path, note: str = "") -> Path:
    """ROC curves, one per strategy, AUC in the legend; an explanation instead when ``curves`` is empty."""
    fig = _figure(6.4, 6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    for (name, c), colour in zip(curves.items(), _colours(len(curves))):
        ax.plot(c["fpr"], c["tpr"], color=colour, lw=1.6, label=f"{name} (AUC {_fmt(c['auc'])})")
    if not curves:
        ax.text(0.5, 0.5, "ROC undefined:\nthe diagnosed patients are all of one class", ha="center", va="center")
    ax.set(title=f"ROC of the patient score per fusion method{note}", xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path)
    return path


# Files -----------------------------------------------------------------------------------------


def patient_table(evaluation: Evaluation) -> tuple[list[str], list[dict]]:
    """patients.csv: fields and one row per patient; per strategy its label and score (empty for errors)."""
    decisions = strategy_decisions(evaluation.components(), evaluation.settings)
    fields = ["patient_id", "label", "location", "sequences", *CSV_FIELDS[2:]]
    fields += [f"{name}_{col}" for name in decisions for col in ("label", "p")]
    rows, i = [], 0  # i: position among the diagnosed patients
    for r in evaluation.results:
        row = {**r.csv_row(), "location": LOCATION_SEPARATOR.join(r.locations), "sequences": ";".join(r.series_sequences)}
        if r.diagnosis is not None:
            for name, ds in decisions.items():
                row[f"{name}_label"], row[f"{name}_p"] = LABELS[ds[i].label], f"{ds[i].p_malignant:.6f}"
            i += 1
        rows.append(row)
    return fields, rows


def write_report(evaluation: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """Every report file under ``out_dir`` (created); returns {file name: path}.

    evaluation.json (what ``--json`` writes), table3.json/csv (the six strategies and Det-Seq-Age at
    the paper's weights, wff.ensemble.metrics.table3), per_location.json/csv/png (Fig. 6),
    sequences.json/csv/png (Fig. 7), roc.csv/png and patients.csv.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = evaluation.to_dict()
    served = evaluation.settings.served_strategy
    files: dict[str, Path] = {}

    def put(path: Path) -> None:
        files[path.name] = path

    put(_write_json(out / "evaluation.json", data))
    table3 = {name: {**{k: json_number(m[k]) for k in METRICS}, **{k: int(m[k]) for k in COUNTS}} for name, m in evaluation.table.items()}
    put(_write_json(out / "table3.json", {"served_strategy": served, "patients": data["patients"], "errors": data["errors"], "strategies": table3}))
    put(_write_csv(out / "table3.csv", ("strategy", *METRICS, *COUNTS), [{"strategy": n, **m} for n, m in table3.items()]))

    per_location = data["per_location"]
    put(_write_json(out / "per_location.json", per_location))
    put(_write_csv(out / "per_location.csv", ("strategy", "location", "patients", "wrong", "error_rate"),
                   [{"strategy": n, "location": loc, **row} for n, rows in per_location.items() for loc, row in rows.items()]))
    put(plot_per_location(per_location, out / "per_location.png", served, len(evaluation.diagnosed)))

    sequences = data["sequences"]
    put(_write_json(out / "sequences.json", sequences))
    put(_write_csv(out / "sequences.csv", ("subset", "sequences", "patients", "left_out", "strategy", *METRICS),
                   [{"subset": s, "sequences": e["sequences"] if isinstance(e["sequences"], str) else ";".join(e["sequences"]),
                     "patients": e["patients"], "left_out": e["left_out"], "strategy": n, **m}
                    for s, e in sequences.items() for n, m in e["strategies"].items()]))
    put(plot_sequences(sequences, out / "sequences.png"))

    curves = roc_curves(evaluation)
    n_pos = sum(r.label for r in evaluation.diagnosed)
    put(_write_csv(out / "roc.csv", ("strategy", "threshold", "fpr", "tpr"),
                   [{"strategy": n, "threshold": t, "fpr": f, "tpr": p} for n, c in curves.items()
                    for t, f, p in zip(c["thresholds"], c["fpr"], c["tpr"])]))
    put(plot_roc(curves, out / "roc.png", f"\n{len(evaluation.diagnosed) - n_pos} benign, {n_pos} malignant patients"))

    put(_write_csv(out / "patients.csv", *patient_table(evaluation)))
    return files


def ablation_table(rows: Mapping[str, Mapping]) -> dict[str, dict[str, dict]]:
    """{row label: {strategy: acc, auc, se, sp}} from evaluation dicts (``wff evaluate --json`` files)."""
    if not rows:
        raise ValueError("no evaluations to compare; pass {label: evaluation dict} with at least one entry")
    table = {}
    for label, data in rows.items():
        strategies = data.get("strategies") if isinstance(data, Mapping) else None
        if not isinstance(strategies, Mapping) or not strategies:
            raise ValueError(f"{label!r}: no 'strategies' in the evaluation dict; pass what wff evaluate --json writes")
        table[str(label)] = {name: {k: m.get(k) for k in METRICS} for name, m in strategies.items()}
    return table


def plot_ablation(table: Mapping[str, Mapping[str, Mapping]], path: Path, title: str) -> Path:
    """ACC and AUC of every strategy, one bar per compared run (e.g. clip length N)."""
    fig = _figure(12, 4.6)
    axes = fig.subplots(1, 2)
    names = list(dict.fromkeys(n for strategies in table.values() for n in strategies))
    for ax, metric in zip(axes, ("acc", "auc")):
        series = {label: [strategies.get(n, {}).get(metric) for n in names] for label, strategies in table.items()}
        series = {label: [math.nan if v is None else v for v in values] for label, values in series.items()}
        _grouped_bars(ax, names, series, _colours(len(series)), values_on_bars=True)
        ax.set(title=metric.upper(), xlabel="fusion method", ylabel=metric.upper(), ylim=(0, 1.1))
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=8, title="run", title_fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=len(series), frameon=False)
    fig.suptitle(title)
    fig.savefig(path)
    return path


def write_ablation(rows: Mapping[str, Mapping], out_dir: str | Path, title: str = "Ablation: Table 3 per run") -> dict[str, Path]:
    """Compare evaluations, e.g. the clip-length ablation {"N=4": dict, "N=8": dict, "N=16": dict}.

    Each value is an evaluation dict as ``wff evaluate --json`` (or the report's evaluation.json)
    writes it. Writes ablation.json ({label: {strategy: acc, auc, se, sp}}), ablation.csv and
    ablation.png (ACC and AUC per strategy, one bar per label, in the order given) under
    ``out_dir``; returns {file name: path}.
    """
    table = ablation_table(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _write_json(out / "ablation.json", table),
        _write_csv(out / "ablation.csv", ("run", "strategy", *METRICS),
                   [{"run": label, "strategy": n, **m} for label, strategies in table.items() for n, m in strategies.items()]),
        plot_ablation(table, out / "ablation.png", title),
    ]
    return {p.name: p for p in files}
