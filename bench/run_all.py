"""Run every bench and gather their last JSON lines into one table.

Each bench runs as its own process (its quick variant by default: minutes, not hours; a quick
figure is a smoke-level measurement, say so when you quote it), with a time limit. The table
(what, ours, baseline, ratio, target, met) goes to ``bench/results/run_all.md`` and ``.json``,
and with ``--readme`` into README.md between the ``bench-table`` markers, headed by the date,
the CPU and the plain-loop tokens/s of this machine (``bench/pretrain.py``'s baseline), since
machines of one kind differ up to 3x in speed.

    python bench/run_all.py [--full] [--only pretrain,rollout] [--timeout 1200] [--readme]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
README = ROOT.parent / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"

# bench -> (what it measures, quick arguments, full arguments)
BENCHES = {
    "pretrain": ("pretrain stage tokens/s over a plain PyTorch loop", ["--steps", "20", "--repeats", "1"], []),
    "rollout": ("fast generation engine over model.generate (GRPO rollouts)", ["--quick", "--model", "tiny"], []),
    "choice_scoring": ("multiple-choice scoring throughput", ["--items", "16"], []),
    "sandbox": ("sandboxed code execution overhead", ["--runs", "10"], []),
    "dedup": ("near-duplicate recall/precision (MinHash LSH)",
              ["--sizes", "2000", "--paraphrase", "0", "--semantic-texts", "0", "--sweep", ""], []),
    "word_categories": ("word categories from embeddings vs WordNet", ["--words", "500", "--k", "20"], []),
    "cluster_bbc": ("topic clustering of BBC News (NMI)", ["--model-texts", "0", "--same-truncation-texts", "200"], []),
    "cluster_balance": ("cluster-balanced sampling, rare topic perplexity", ["--steps", "60", "--seeds", "0"], []),
    "curriculum": ("easy-to-hard pacing vs random order", ["--quick"], []),
    "augment": ("augmentation's effect on held-out metrics", ["--quick"], []),
    "gan_oracle": ("adversarial stage vs MLE under an oracle", ["--quick"], []),
    "fewshot_bbc": ("pseudo-labelled BBC accuracy (SmolLM2)",
                    ["--eval-n", "40", "--rounds", "1", "--per-class", "8", "--max-inputs", "100", "--steps", "5",
                     "--icl-k", "0"], []),
    "adapters": ("LoRA vs full fine-tuning in self-training (SmolLM2)",
                 ["--max-steps", "5", "--rounds", "1", "--limit", "40"], []),
    "selfplay_arith": ("self-play on 2-digit addition (SmolLM2), vs plain TRL",
                       ["--arms", "generator,trl", "--max-steps", "2", "--eval-every", "2", "--eval-n", "20",
                        "--groups", "2", "--generations", "4", "--minutes", "1"], []),
    "large_corpus": ("a generated corpus through selftrain run (quick: 0.2 GB, curriculum + paced pretrain + "
                     "cluster; full: 2 GB, pretrain + cluster) in bounded memory", ["--quick", "--curriculum"], []),
}


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"bench"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_one(name: str, args: list[str], timeout: int) -> dict:
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *args], capture_output=True, text=True,
                             timeout=timeout, cwd=ROOT.parent)
        line, status = last_json(out.stdout), ("ok" if out.returncode == 0 else f"exit {out.returncode}")
        tail = (out.stdout + out.stderr)[-1500:]
    except subprocess.TimeoutExpired:
        line, status, tail = None, f"timeout {timeout}s", ""
    if line is None and status == "ok":
        status = "no JSON line"
    return {"bench": name, "status": status, "seconds": round(time.perf_counter() - start), "result": line,
            "tail": tail if status != "ok" else ""}


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(rows: list[dict]) -> str:
    lines = ["| bench | what | metric | ours | baseline | ratio | target | met | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["result"] or {}
        what = BENCHES[row["bench"]][0]
        if row["status"] != "ok":
            lines.append(f"| {row['bench']} | {what} | {row['status']} | – | – | – | – | – | {row['seconds']} s |")
            continue
        lines.append(f"| {row['bench']} | {what} | `{r.get('metric')}` | {fmt(r.get('value'))} | "
                     f"{fmt(r.get('baseline'))} | {fmt(r.get('ratio'))} | {fmt(r.get('target'))} | "
                     f"{fmt(r.get('met'))} | {row['seconds']} s |")
    return "\n".join(lines)


def machine() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        flags, model = set(), platform.processor()
    simd = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores, {simd}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="each bench's default (full) variant: hours")
    ap.add_argument("--only", default="", help="comma list of benches (default: all)")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per bench")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        ap.error(f"unknown bench(es) {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    rows = []
    for name in names:
        print(f"[run_all] {name} ...", flush=True)
        rows.append(run_one(name, BENCHES[name][2] if args.full else BENCHES[name][1], args.timeout))
        print(f"[run_all] {name}: {rows[-1]['status']} in {rows[-1]['seconds']} s: {rows[-1]['result']}", flush=True)
        if rows[-1]["tail"]:
            print(rows[-1]["tail"], flush=True)
    plain = next((r["result"].get("baseline") for r in rows if r["bench"] == "pretrain" and r["result"]), None)
    head = (f"{time.strftime('%Y-%m-%d')}, {'full' if args.full else 'quick'} variants "
            f"({'measurements' if args.full else 'smoke-level figures: small sizes, few steps'}); {machine()}; "
            f"plain PyTorch training loop on this machine: {fmt(plain)} tokens/s (tiny preset, `bench/pretrain.py`).")
    body = f"{head}\n\n{table(rows)}\n"
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / "run_all.md").write_text(body)
    (out / "run_all.json").write_text(json.dumps({"head": head, "rows": rows}, indent=1))
    print("\n" + body)
    if args.readme:
        text = README.read_text()
        if START not in text or END not in text:
            sys.exit(f"README.md has no {START} ... {END} markers")
        before, rest = text.split(START, 1)
        README.write_text(f"{before}{START}\n{body}{END}{rest.split(END, 1)[1]}")
        print(f"wrote the table into {README}")
    failed = [r["bench"] for r in rows if r["status"] != "ok"]
    print(json.dumps({"bench": "run_all", "metric": "benches_completed", "value": len(rows) - len(failed),
                      "baseline": len(rows), "ratio": round((len(rows) - len(failed)) / len(rows), 2),
                      "target": 1.0, "met": not failed, "failed": failed}))


if __name__ == "__main__":
    main()
