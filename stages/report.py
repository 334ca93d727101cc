"""Stage 4: gather evaluated runs into results/report.md with PNG plots: the metrics per loss, learning curves,
and AKL's head and tail gaps over training."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ReportConfig
from pipeline.errors import extra

ORDER = [
    "teacher",
    "start",
    "sft",
    "fkl",
    "rkl",
    "jsd",
    "tvd",
    "sfkl",
    "srkl",
    "akl",
    "online-akl",
    "online-fkl",
    "onpolicy-fkl",
    "onpolicy-akl",
    "onpolicy-jsd",
    "onpolicy-rkl",
    "onpolicy-pg",
]
METRICS = [
    ("rougeL", "ROUGE-L", "{:.1f}"),
    ("answer_accuracy", "answer acc. %", "{:.1f}"),
    ("exact_match", "exact match %", "{:.1f}"),
    ("nll", "NLL", "{:.3f}"),
    ("ppl", "PPL", "{:.2f}"),
    ("exact_fkl_to_teacher", "KL(T‖S)", "{:.4f}"),
    ("exact_rkl_to_teacher", "KL(S‖T)", "{:.4f}"),
    ("fkl_to_teacher", "KL(T‖S)", "{:.4f}"),  # from the test split's cache: where no exact one was measured
    ("rkl_to_teacher", "KL(S‖T)", "{:.4f}"),
    ("own_fkl_to_teacher", "KL(T‖S) own gen.", "{:.4f}"),
]
EXACT = {"fkl_to_teacher": "exact_fkl_to_teacher", "rkl_to_teacher": "exact_rkl_to_teacher"}


def cell(text: str) -> str:
    """Text as one Markdown table cell: its line breaks as <br>, its pipes escaped."""
    return text.replace("|", "\\|").replace("\n", "<br>")


def _label(e: dict) -> str:
    return e.get("label") or Path(e["model"]).parent.name


def _order(label: str):
    """teacher first, then by student, then losses in ORDER."""
    student, _, loss = label.rpartition("/")
    return (label != "teacher", student, ORDER.index(loss) if loss in ORDER else len(ORDER), loss)


def _fmt(values: list[float], fmt: str) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _metrics_rows(run_dir: str | None) -> list[dict]:
    if not run_dir or not (Path(run_dir) / "metrics.jsonl").exists():
        return []
    return [json.loads(l) for l in open(Path(run_dir) / "metrics.jsonl") if l.strip()]


@dataclass
class Evaluated:
    """The evaluations grouped for the report: by label (each run at its last round) and, for runs with rounds,
    by label and round."""

    groups: dict[str, list[dict]]
    by_round: dict[str, dict[int, list[dict]]]
    labels: list[str]
    present: list[tuple]


def gather(paths: list[str]) -> Evaluated:
    evals = [json.loads(Path(p).read_text()) for p in paths]
    by_round: dict[str, dict[int, list[dict]]] = {}
    for e in evals:
        if e.get("round") is not None:
            by_round.setdefault(_label(e), {}).setdefault(e["round"], []).append(e)
    groups: dict[str, list[dict]] = {}
    for e in evals:  # the table shows every run at its last round
        rounds = by_round.get(_label(e))
        if rounds is None or e["round"] == max(rounds):
            groups.setdefault(_label(e), []).append(e)
    present = [m for m in METRICS if any(m[0] in e for e in evals)]
    present = [m for m in present if not any(EXACT.get(m[0]) == x[0] for x in present)]  # exact over cached
    return Evaluated(groups, by_round, sorted(groups, key=_order), present)


def run(cfg: ReportConfig) -> str:
    extra("matplotlib", "the report's plots").use("Agg")
    import matplotlib.pyplot as plt

    ev = gather(cfg.evals)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {cfg.title}",
        "",
        "| model | seeds | " + " | ".join(m[1] for m in ev.present) + " |",
        "|---|---|" + "---|" * len(ev.present),
    ]
    for label in ev.labels:
        g = ev.groups[label]
        cells = [_fmt([e[m] for e in g if m in e], fmt) for m, _, fmt in ev.present]
        lines.append(f"| {label} | {len(g)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Mean ± standard deviation over seeds where there are several. KL columns: per distilled token, exact",
        "over the full vocabulary with the teacher run beside the model (or, where it was not, from the held-out",
        "split's teacher cache), on the held-out split; \"own gen.\": on the model's own greedy responses to the",
        "held-out prompts. On-policy rows: the last round.",
    ]
    for title, name, plot in PLOTS:
        fig = plot(plt, ev)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out.parent / name, dpi=110)
        plt.close(fig)
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    examples = next((e.get("examples") for l in reversed(ev.labels) for e in ev.groups[l] if e.get("examples")), None)
    if examples:
        lines += [
            "",
            "## Sample generations (" + ev.labels[-1] + ")",
            "",
            "| prompt | reference | prediction |",
            "|---|---|---|",
        ]
        lines += [f"| {cell(x['prompt'])} | {cell(x['reference'])} | {cell(x['prediction'])} |" for x in examples]
    out.write_text("\n".join(lines) + "\n")
    return str(out)


def metrics_per_loss(plt, ev: Evaluated):
    shown = ev.present[:3]
    fig, axes = plt.subplots(1, len(shown) or 1, figsize=(4.5 * max(1, len(shown)), 3.5))
    for ax, (m, name, _) in zip(axes if hasattr(axes, "__iter__") else [axes], shown):
        vals = [[e[m] for e in ev.groups[l] if m in e] for l in ev.labels]
        ax.bar(
            ev.labels,
            [statistics.mean(v) if v else 0 for v in vals],
            yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals],
            color="#4c72b0",
            capsize=3,
        )
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=45)
    return fig


def learning_curves(plt, ev: Evaluated):
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.get_cmap("tab10")
    for c, label in enumerate(ev.labels):
        for n, e in enumerate(ev.groups[label]):
            rows = [r for r in _metrics_rows(e.get("run")) if "eval_fkl" in r]
            if rows and label != "teacher":
                ax.plot(
                    [r["step"] for r in rows],
                    [r["eval_fkl"] for r in rows],
                    color=colors(c % 10),
                    label=label if n == 0 else None,
                )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out KL(teacher ‖ student) per token")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Learning curves (one line per seed)")
    return fig


def akl_gaps(plt, ev: Evaluated):
    akl = [
        r
        for l in ev.labels
        if l.rpartition("/")[2] == "akl"
        for e in ev.groups[l]
        for r in [_metrics_rows(e.get("run"))]
        if r
    ]
    if not akl:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in akl[0] if "g_head" in r]
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["g_head"] for r in rows], label="g_head")
    ax.plot(steps, [r["g_tail"] for r in rows], label="g_tail")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["w_head"] for r in rows], "k--", label="w_head")
    ax2.set_ylabel("w_head")
    ax2.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("gap (sum of |p − q|)")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.set_title("AKL head and tail gaps over training")
    return fig


def onpolicy_rounds(plt, ev: Evaluated):
    rounds_plot = [l for l in ev.by_round if l.rpartition("/")[2].startswith("onpolicy")]
    if not rounds_plot:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap("tab10")
    metrics = ("answer_accuracy", "own_fkl_to_teacher")
    for c, label in enumerate(rounds_plot):
        student = label.rpartition("/")[0]
        start = ev.by_round.get(f"{student}/start" if student else "start", {}).get(0, [])
        rounds = {0: start, **ev.by_round[label]} if start else ev.by_round[label]
        xs = sorted(rounds)
        for ax, metric in zip(axes, metrics):
            ys = [
                statistics.mean(e[metric] for e in rounds[r] if metric in e)
                for r in xs
                if any(metric in e for e in rounds[r])
            ]
            if len(ys) == len(xs):
                ax.plot(xs, ys, "o-", color=colors(c % 10), label=label)
    for c, label in enumerate(l for l in ev.labels if l.rpartition("/")[2] in ("sft", "fkl", "akl")):
        for ax, metric in zip(axes, metrics):
            vals = [e[metric] for e in ev.groups[label] if metric in e]
            if vals:
                ax.axhline(
                    statistics.mean(vals),
                    ls="--",
                    lw=1,
                    color=colors((c + 5) % 10),
                    label=f"{label} (off-policy, same updates)",
                )
    axes[0].set_ylabel("held-out answer accuracy %")
    axes[1].set_ylabel("KL(teacher ‖ student) on its own greedy generations")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("on-policy round (0: the start checkpoint)")
        ax.legend(fontsize=7)
    fig.suptitle("On-policy rounds (mean over seeds)")
    return fig


PLOTS = [
    ("Metrics per loss", "metrics_per_loss.png", metrics_per_loss),
    ("Learning curves", "learning_curves.png", learning_curves),
    ("AKL head and tail gaps", "akl_gaps.png", akl_gaps),
    ("On-policy rounds", "onpolicy_rounds.png", onpolicy_rounds),
]
