"""Run every benchmark, merge their JSON into bench/results.json, and print the README's tables."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
SCRIPTS = ["storage_size.py", "loss_memory.py", "throughput.py"]


def tables(r: dict) -> str:
    lines = [f"Machine: {r['machine']}", "", "| k | backend | bytes / distilled position | raw (ids + fp16 + tail) | "
             "streaming read, positions/s |", "|---|---|---|---|---|"]
    for row in r["storage"]["rows"]:
        lines.append(f"| {row['k']} | {row['backend']} | {row['bytes_per_position']:.0f} | {row['raw_bytes_per_position']} "
                     f"| {row['read_positions_per_s'] / 1e6:.2f} M |")
    lines += ["", "| V | path | peak MB | × CE memory | median s | × CE time |", "|---|---|---|---|---|---|"]
    for row in r["loss_memory"]["rows"]:
        lines.append(f"| {row['v']} | {row['case']} | {row['peak_mb']:.0f} | {row['memory_vs_ce']:.2f} | "
                     f"{row['median_s']:.2f} | {row['time_vs_ce']:.2f} |")
    t = r["throughput"]
    lines += ["", "| data | cache-teacher ÷ forward, 46M teacher | same, 12×1024 teacher | cached KD ÷ SFT | "
              "cached KD ÷ online KD (measured) | theoretical |", "|---|---|---|---|---|---|"]
    for row in t["rows"]:
        lines.append(f"| {row['data']} | {row['cache_teacher_over_forward']:.3f} | "
                     f"{row['body_heavy_cache_teacher_over_forward']:.3f} | {row['cached_kd_over_sft']:.3f} | "
                     f"{row['cached_kd_speedup_over_online']:.2f}× | {t['theoretical_speedup_over_online']:.2f}× |")
    lines += ["", f"Peak memory above the loaded model, instruction batches: plain forward "
              f"{t['peak_mb']['teacher_forward']:.0f} MB, cache-teacher {t['peak_mb']['cache_teacher']:.0f} MB. "
              f"Teacher {t['teacher_params'] / 1e6:.0f}M (12×1024 teacher: {t['body_heavy_teacher_params'] / 1e6:.0f}M), "
              f"student {t['student_params'] / 1e6:.0f}M parameters, "
              f"V = {t['vocab']}, batches of {t['batch']} × {t['seq']} tokens."]
    return "\n".join(lines)


def main(only=None):
    """Run the benchmark scripts (or only those named) and merge every script's latest JSON."""
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    for s in only or SCRIPTS:
        print(f"== {s}", flush=True)
        subprocess.run([sys.executable, str(HERE / s)], check=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}, CPU",
               "storage": json.loads((out / "storage.json").read_text()),
               "loss_memory": json.loads((out / "loss_memory.json").read_text()),
               "throughput": json.loads((out / "throughput.json").read_text())}
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print(tables(results))


if __name__ == "__main__":
    main(sys.argv[1:] or None)   # e.g. `python bench/run_all.py throughput.py` reruns one and merges
