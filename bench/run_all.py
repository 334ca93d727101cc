"""Run the benchmarks (or those named), merge every script's latest JSON into bench/results.json, and print the
README's tables. `python bench/run_all.py [storage_size.py fidelity.py …]`; `--tables` runs none (merge and print)."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
SCRIPTS = {
    "storage_size.py": "storage",
    "loss_memory.py": "loss_memory",
    "throughput.py": "throughput",
    "fidelity.py": "fidelity",
    "scale.py": "scale",
    "onpolicy.py": "onpolicy",
    "real_teacher.py": "real_teacher",
}


def storage_table(r) -> list[str]:
    """Zarr, Arrow (one row per sample) and Arrow as written before 0.2 (one row per part), side by side."""
    lines = [
        "| V | encoding | B/pos: zarr / arrow | mean width | decoded read, M pos/s/core: zarr / arrow / arrow one row "
        "per part | arrow ÷ one row per part |",
        "|---|---|---|---|---|---|",
    ]
    rows = {(x["vocab"], x["encoding"], x["backend"]): x for x in r["rows"]}
    for (v, enc, backend), x in rows.items():
        if backend != "zarr":
            continue
        a, old = rows[(v, enc, "arrow")], rows.get((v, enc, "arrow, one row per part"))
        width = f"{x['mean_width']:.1f}" + (f" + {x['mean_drawn']:.1f} drawn" if x["mean_drawn"] else "")
        reads = [y["read_positions_per_s"] / 1e6 for y in (x, a, old) if y]
        ratio = f"{a['read_positions_per_s'] / old['read_positions_per_s']:.2f}" if old else "–"
        lines.append(
            f"| {v} | {enc} | {x['bytes_per_position']:.0f} / {a['bytes_per_position']:.0f} | {width} | "
            f"{' / '.join(f'{y:.2f}' for y in reads)} | {ratio} |"
        )
    return lines


def fidelity_table(r) -> list[str]:
    lines = []
    for name, res in r.items():
        lines += [
            "",
            f"**{name}** ({res['where']}; V = {res['vocab']}, {res['steps']} steps, seeds "
            f"{res['seeds']}, {res['positions']} distilled training positions; measured {res.get('measured', '?')})",
            "",
            "| arm | B/pos | decode KL | held-out KL(T‖S) | ÷ online | NLL | FKL gradient error vs online (angle), "
            "student at init / trained |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in res["rows"]:
            b = f"{row['bytes_per_position']:.1f}" if "bytes_per_position" in row else "–"
            dkl = f"{row['decode_kl_mean']:.1e}" if row.get("decode_kl_mean") is not None else "–"
            ang = (
                f"{row['grad_rel_error_at_student_init']:.1%} ({row['grad_angle_deg_at_student_init']:.1f}°) / "
                f"{row['grad_rel_error_at_online_student']:.1%} ({row['grad_angle_deg_at_online_student']:.1f}°)"
                if "grad_angle_deg_at_online_student" in row
                else "–"
            )
            lines.append(
                f"| {row['arm']} | {b} | {dkl} | {row['kl']:.4f} ± {row['kl_std']:.4f} | "
                f"{row['kl_vs_online']:.3f} | {row['nll']:.3f} ± {row['nll_std']:.3f} | {ang} |"
            )
    return lines


def loss_table(r) -> list[str]:
    lines = ["| V | path | peak MB | × CE memory | median s | × CE time |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(
            f"| {row['v']} | {row['case']} | {row['peak_mb']:.0f} | {row['memory_vs_ce']:.2f} | "
            f"{row['median_s']:.2f} | {row['time_vs_ce']:.2f} |"
        )
    return lines


def throughput_table(t) -> list[str]:
    lines = [
        "| teacher | data | cache encoding | cache-teacher ÷ forward: median of rounds (range) | forward tok/s |",
        "|---|---|---|---|---|",
    ]
    for r in t["cache_teacher"]:
        lines.append(
            f"| {r['teacher']} | {r['data']} | {r['encoding']} | **{r['ratio']:.3f}** ({r['ratio_min']:.3f}–"
            f"{r['ratio_max']:.3f}, {r['rounds']} rounds) | {r['forward_tok_s']:.0f} |"
        )
    lines += [
        "",
        "| data | cached KD ÷ SFT: median of rounds (range) | cached KD ÷ online KD (measured) | theoretical |",
        "|---|---|---|---|",
    ]
    for row in t["rows"]:
        sft, online = row["cached_kd_over_sft"], row["cached_kd_speedup_over_online"]
        lines.append(
            f"| {row['data']} | {sft['ratio']:.3f} ({sft['ratio_min']:.3f}–{sft['ratio_max']:.3f}) | "
            f"{online['ratio']:.2f}× ({online['ratio_min']:.2f}–{online['ratio_max']:.2f}) | "
            f"{t['theoretical_speedup_over_online']:.2f}× |"
        )
    return lines


def scale_lines(s) -> list[str]:
    m, tk, pk = s["memory"], s["tokenize"], s["packing"]
    return [
        f"- cache-teacher peak memory above a 1-sample run: {m['small']['samples']} samples "
        f"{m['small']['vm_rss_mb'] - m['base']['vm_rss_mb']} MB, {m['large']['samples']} samples "
        f"{m['large']['vm_rss_mb'] - m['base']['vm_rss_mb']} MB: ×{m['vm_rss_mb_large_over_small']:.2f} "
        f"(anonymous memory ×{m['rss_anon_mb_large_over_small']:.2f}).",
        f"- tokenization: {tk['num_proc_1_samples_per_s']:.0f} samples/s with --num-proc 1, "
        f"{tk['num_proc_2_samples_per_s']:.0f} with 2 (×{tk['speedup_2_over_1']:.2f}).",
        f"- packing: {pk['packed']['real_tokens_per_s']:.0f} real tokens/s packed vs "
        f"{pk['padded']['real_tokens_per_s']:.0f} padded (×{pk['packed_over_padded']:.2f}); tokens computed per "
        f"real token {pk['packed']['computed_over_real_tokens']:.2f} vs "
        f"{pk['padded']['computed_over_real_tokens']:.2f}.",
    ]


def onpolicy_lines(o) -> list[str]:
    """Ratios (absolute CPU speeds mean little): our generation loop and teacher-mixed sampling against plain
    `model.generate`, and each stage's share of one round."""
    r, x = o["round_seconds"], o["pipeline_over_plain"]
    plain = o["plain_model_generate"]["tokens_per_s"]
    mixed = o["pipeline_generate_teacher_mixed"]["tokens_per_s"] / plain
    x = f"×{x['ratio']:.2f} ({x['ratio_min']:.2f}–{x['ratio_max']:.2f})"
    total = sum(r.values())
    return [
        f"- generation: `pipeline generate` {x} the tokens/s of plain `model.generate`; teacher-mixed (α = 0.2) "
        f"×{mixed:.2f}.",
        f"- one round ({o['prompts']} prompts): generate {r['generate'] / total:.0%}, cache-teacher "
        f"{r['cache_teacher'] / total:.0%}, train {r['train'] / total:.0%} of its wall time.",
    ]


def real_teacher_table(r) -> list[str]:
    d, e = r["distribution"], r["encodings"]
    out = [
        f"{r['teacher']}, V = {r['vocab']}, {r['passages']} passages of each text; "
        + "; ".join(
            f"{kind}: mean top-1 probability {x['mean_top1']:.2f}, beyond the top 64 {x['mean_tail_beyond_64']:.2f}"
            for kind, x in d.items()
        ),
        "",
        "| encoding | " + " | ".join(f"B/pos {kind} | mean width {kind} | distinct draws {kind}" for kind in e) + " |",
        "|---|" + "---|---|---|" * len(e),
    ]
    for name in next(iter(e.values())):
        cells = [f"{x[name]['bytes_per_position']:.1f} | {x[name]['mean_width']:.1f} | {x[name]['mean_drawn']:.1f}"
                 for x in e.values()]  # fmt: skip
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def tables(r: dict) -> str:
    out = [f"Machine: {r['machine']}", ""]
    for key, fn in (
        ("storage", storage_table),
        ("loss_memory", loss_table),
        ("throughput", throughput_table),
        ("fidelity", fidelity_table),
        ("scale", scale_lines),
        ("onpolicy", onpolicy_lines),
        ("real_teacher", real_teacher_table),
    ):
        if key in r:
            out += [f"### {key}", *fn(r[key]), ""]
    return "\n".join(out)


def main(only=None):
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    for s in SCRIPTS if only is None else only:
        print(f"== {s}", flush=True)
        subprocess.run([sys.executable, str(HERE / s)], check=True)
    # the entries of scripts not run here (a fresh clone has no bench/out) stay as the last run left them
    results = json.loads((HERE / "results.json").read_text()) if (HERE / "results.json").exists() else {}
    machine = platform.processor() or platform.machine()
    results["machine"] = f"{machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    for key in SCRIPTS.values():
        if (out / f"{key}.json").exists():
            results[key] = json.loads((out / f"{key}.json").read_text())
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print(tables(results))


if __name__ == "__main__":
    main([] if sys.argv[1:] == ["--tables"] else sys.argv[1:] or None)
