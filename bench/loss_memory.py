"""Peak memory and time of the loss paths against plain cross-entropy, forward + backward from hidden states
through the lm_head (N positions, hidden H, vocabulary V), each case in a fresh process.

  ce        logits = h @ W.T; F.cross_entropy                          (what SFT pays)
  sparse    logits = h @ W.T; sparse_kd_loss (top-k + tail, AKL)       (cache path, full logits)
  chunked   sparse_kd_loss_from_hidden, 1024 positions per chunk      (never all logits at once)
  dense     logits = h @ W.T; dense_kd_loss vs teacher logits [N, V]   (online KD, teacher logits given)
  sketch    logits = h @ W.T; sparse_kd_loss with 24 exact draws and a rank-32 teacher sketch (AKL over the full
            vocabulary in chunks of 1024 positions, each recomputed in backward)

Peak = max RSS during the case minus RSS after inputs are allocated. CPU only here: the figures are ratios
measured side by side in one run. V = 49152 is the real teacher's (SmolLM2). Writes bench/out/loss_memory.json;
`--vocab 49152 --n 2048 --cases ce,dense,sketch --out loss_sketch.json` runs a subset.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

CASE = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, {root!r})
from pipeline import losses
torch.manual_seed(0)
n, v, hdim, k, case, repeats = {n}, {v}, {h}, 64, {case!r}, {repeats}
h = torch.randn(n, hdim) * 0.5
w = torch.randn(v, hdim) * 0.05
ids = torch.randint(0, v, (n, k))
lp = torch.log_softmax(torch.randn(n, k), -1) - 0.1
lp = lp.sort(-1, descending=True).values
tail = torch.full((n,), -2.3)
teacher = torch.randn(n, v) if case == "dense" else None
sketch = dict(
    drawn_ids=torch.randint(0, v, (n, 24)), drawn_logprobs=torch.full((n, 24), -6.0),
    drawn_logweights=torch.full((n, 24), -5.5), sketch_coeffs=torch.randn(n, 32), sketch_basis=torch.randn(33, v),
) if case == "sketch" else None
y = torch.randint(0, v, (n,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def step():
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    if case == "ce":
        loss = torch.nn.functional.cross_entropy(hh @ ww.T, y)
    elif case == "sparse":
        loss = losses.sparse_kd_loss(hh @ ww.T, ids, lp, tail, "akl").mean()
    elif case == "sketch":
        loss = losses.sparse_kd_loss(hh @ ww.T, ids, lp, tail, "akl", **sketch).mean()
    elif case == "chunked":
        loss = losses.sparse_kd_loss_from_hidden(hh, ww, ids, lp, tail, "akl", chunk_size=1024).mean()
    else:
        loss = losses.dense_kd_loss(hh @ ww.T, teacher, "akl").mean()
    loss.backward()
times = []
for _ in range(repeats):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times.sort()
print(json.dumps({{"median_s": times[len(times) // 2], "peak_mb": (peak - base) / 1024}}))
"""


def run_case(n, v, h, case, repeats):
    code = CASE.format(root=str(ROOT), n=n, v=v, h=h, case=case, repeats=repeats)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


CASES = ("ce", "sparse", "chunked", "sketch", "dense")


def main(n=8192, h=256, vocabs=(32000, 49152, 151936), repeats=3, cases=CASES):
    rows = []
    for v in vocabs:
        logits_mb = n * v * 4 / 2**20
        for case in cases:
            if case == "dense" and 10 * logits_mb > 12 * 1024:  # half of this machine's 24 GB
                print(
                    f"N={n} V={v:6d} dense    skipped: ~10 [N,V] float32 tensors (~{10 * logits_mb / 1024:.0f} GB) "
                    "exceed this 24 GB machine"
                )
                continue
            r = run_case(n, v, h, case, repeats)
            rows.append({"n": n, "v": v, "h": h, "case": case, **r, "logits_mb": logits_mb})
            print(
                f"N={n} V={v:6d} {case:8s} peak {r['peak_mb']:8.0f} MB ({r['peak_mb'] / logits_mb:4.2f}× one "
                f"[N,V] fp32)  median {r['median_s']:.2f} s"
            )
    for v in vocabs:
        ce = next(r for r in rows if r["v"] == v and r["case"] == "ce")
        for r in rows:
            if r["v"] == v:
                r["time_vs_ce"] = r["median_s"] / ce["median_s"]
                r["memory_vs_ce"] = r["peak_mb"] / ce["peak_mb"]
    return {"rows": rows, "repeats": repeats}


if __name__ == "__main__":
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    args = dict(zip(sys.argv[1::2], sys.argv[2::2]))  # --vocab 49152 --n 2048 --cases ce,dense,sketch --out NAME
    kw = {"vocabs": [int(v) for v in args["--vocab"].split(",")]} if "--vocab" in args else {}
    kw |= {"n": int(args["--n"])} if "--n" in args else {}
    kw |= {"cases": tuple(args["--cases"].split(","))} if "--cases" in args else {}
    (out / args.get("--out", "loss_memory.json")).write_text(json.dumps(main(**kw), indent=1))
