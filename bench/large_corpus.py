"""Benchmark: a corpus larger than memory, end to end, under a fixed memory bound.

Generates a multi-gigabyte text corpus (Zipf-distributed words in paragraph-sized documents,
with exact copies and case/punctuation variants planted to be found), then runs the real CLI,
``selftrain run``, on it in a child process: loading and the held-out split (streamed to Arrow),
tokenizer training, the ``pretrain`` stage (the whole pool packed into a block file on disk, a few
training steps; with ``--curriculum`` first a ``curriculum`` stage that scores every text and
trains paced, and the pretrain after it paced too) and the ``cluster`` stage (every text embedded into a memory-mapped file, exact
and semantic duplicates, k-means, c-TF-IDF names). The parent samples the child's memory every
0.2 s from ``/proc`` and prints its peak, per phase.

The figure is the peak **anonymous** resident memory (``RssAnon``): what the process itself holds.
Memory-mapped files also count in RSS while their pages are cached, but the kernel drops those
pages under pressure, so they are shown (peak total RSS) but not bounded. The baseline is the
corpus size: a list-based pipeline holds at least the corpus. Target: peak RssAnon <= the bound
(``--bound-mb``, 2048 by default) with a corpus of at least that size.

The model is the tiny preset shrunk to 2 layers of width 64 and the embedder is that model: the
point is memory, and a bigger network would only make the run longer. MinHash near-duplicates
are off (``dedup.near: null``): at ~1.4 ms (word shingles) to ~6 ms (character shingles) a text on
this CPU they would take hours here, and their signatures (num_perm x 8 bytes a text) and LSH index
live in memory. Semantic duplicates are off too (``dedup.semantic: null``): they compare each text
with the kept ones of its cluster, quadratic in the cluster's size, and an untrained micro model
embeds every text alike (see README, "Corpora larger than memory").

    python bench/large_corpus.py [--gigabytes 2] [--work /tmp/selftrain-large] [--bound-mb 2048]
    python bench/large_corpus.py --quick [--curriculum]     # 0.2 GB
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapters import cpu_flags  # noqa: E402

PHASES = ("loading data", "building model", "evaluating the starting model", "finished")
STAGE_KEY = re.compile(r"\b(r\d+-\d+-[a-z_]+) \(attempt")  # the rule the runner prints as a stage starts


def generate(folder: Path, gigabytes: float, seed: int = 0, file_mb: int = 256) -> dict:
    """Write ``gigabytes`` of paragraphs into ``folder/*.txt`` (kept between runs of one size)."""
    marker = folder.parent / f"{folder.name}.json"  # beside the folder: inside, it would be read as data
    if marker.is_file() and json.loads(marker.read_text()).get("gigabytes") == gigabytes:
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "vo", "de", "an", "er", "is", "on", "ul", "pe", "gra"]
    vocab = sorted({"".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(30000)})
    weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    weights /= weights.sum()
    target, written, docs, copies, variants = int(gigabytes * 1e9), 0, 0, 0, 0
    recent: list[str] = []
    index, out = 0, None
    started = time.perf_counter()
    while written < target:
        if out is None or out.tell() > file_mb * 1e6:
            if out is not None:
                out.close()
            out = open(folder / f"part-{index:03d}.txt", "w", encoding="utf-8")
            index += 1
        roll = rng.random()
        if recent and roll < 0.02:  # an exact copy: removed when the corpus is loaded
            text = recent[int(rng.integers(len(recent)))]
            copies += 1
        elif recent and roll < 0.03:  # the same text in other case and punctuation: the cluster stage's exact dedup
            text = recent[int(rng.integers(len(recent)))].upper().replace(".", "!")
            variants += 1
        else:
            words = rng.choice(len(vocab), int(rng.integers(300, 900)), p=weights)
            sentences = np.array_split(words, max(1, len(words) // 15))
            text = " ".join(" ".join(vocab[w] for w in s).capitalize() + "." for s in sentences)
            recent = (recent + [text])[-1000:]
        out.write(text + "\n\n")
        written += len(text) + 2
        docs += 1
    out.close()
    info = {"gigabytes": gigabytes, "bytes": written, "documents": docs, "exact_copies": copies,
            "case_variants": variants, "seconds": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(info))
    return info


def config_for(corpus: Path, run_dir: Path, curriculum: bool = False) -> dict:
    # scored by token length (a pass of the tokenizer) and trained under sqrt pacing; the pretrain
    # after it inherits the pacing, so both paced paths pack the pool to disk by difficulty
    paced = [{"curriculum": {"difficulty": "length", "max_steps": 20, "block_size": 128, "batch_size": 8,
                             "save_steps": 1000}}] if curriculum else []
    return {
        "run": {"name": "large-corpus", "output_dir": str(run_dir), "seed": 0},
        "model": {"preset": "tiny", "vocab_size": 4096,
                  "architecture": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "num_key_value_heads": 2}},
        "data": {"train": str(corpus), "heldout_fraction": 0.01},
        "eval": {"max_tokens": 8192, "samples": 4},
        "guard": {"tolerance": 10.0},  # the stages are kept whatever they do: this bench measures memory
        "stages": [
            *paced,
            {"pretrain": {"max_steps": 20, "block_size": 128, "batch_size": 8, "save_steps": 1000}},
            {"cluster": {"embedder": "model", "max_length": 32, "dedup": {"near": None, "semantic": None},
                         "word_categories": None,
                         "map": "pca", "k": "auto", "k_range": [2, 8]}},
        ],
    }


def status(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and VmRSS of ``pid`` in kB (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def run_child(config_path: Path, log_path: Path) -> dict:
    """Run ``selftrain run`` and sample its memory; return peaks overall and per phase."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1",
           "COLUMNS": "200"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "selftrain", "run", str(config_path)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        phase = {"name": "start"}
        peaks: dict[str, dict[str, int]] = {}

        def follow():  # the current phase is the last marker the run printed
            seen = 0
            while child.poll() is None:
                text = log_path.read_text(errors="replace")
                for line in text[seen:].splitlines():
                    for marker in PHASES:
                        if marker in line:
                            phase["name"] = marker
                    if stage := STAGE_KEY.search(line):
                        phase["name"] = stage.group(1)
                seen = len(text)
                time.sleep(0.5)

        threading.Thread(target=follow, daemon=True).start()
        while child.poll() is None:
            now = status(child.pid)
            if now:
                peak = peaks.setdefault(phase["name"], {"RssAnon": 0, "RssFile": 0, "VmRSS": 0})
                for key, value in now.items():
                    peak[key] = max(peak[key], value)
            time.sleep(0.2)
    return {"returncode": child.returncode, "seconds": round(time.perf_counter() - started, 1), "phases": peaks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gigabytes", type=float, default=2.0, help="size of the generated corpus")
    ap.add_argument("--quick", action="store_true", help="a 0.2 GB corpus (minutes; a smoke test of the bench)")
    ap.add_argument("--work", default="/tmp/selftrain-large", help="where the corpus and the run go")
    ap.add_argument("--bound-mb", type=float, default=2048, help="the memory bound (peak RssAnon, MB)")
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    ap.add_argument("--curriculum", action="store_true",
                    help="first a curriculum stage (difficulty by length, paced training); the pretrain after it is paced")
    args = ap.parse_args()
    gigabytes = 0.2 if args.quick else args.gigabytes
    work = Path(args.work)
    corpus = generate(work / f"corpus-{gigabytes:g}gb", gigabytes)
    print(f"corpus: {corpus['bytes'] / 1e9:.2f} GB, {corpus['documents']} documents "
          f"({corpus['exact_copies']} exact copies, {corpus['case_variants']} case variants), "
          f"generated in {corpus['seconds']} s", flush=True)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config_path = work / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(config_for(work / f"corpus-{gigabytes:g}gb", run_dir, args.curriculum),
                                          sort_keys=False))
    result = run_child(config_path, work / "run.log")
    if result["returncode"] != 0:
        print((work / "run.log").read_text()[-3000:])
        raise SystemExit(f"selftrain run failed with exit code {result['returncode']}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {e["name"]: e for e in manifest["stages"]}
    cluster = stages["cluster"]["stage_metrics"]
    peak_anon = max(p["RssAnon"] for p in result["phases"].values()) / 1024
    peak_rss = max(p["VmRSS"] for p in result["phases"].values()) / 1024
    print(f"\nselftrain run: {result['seconds']} s, CPU flags {' '.join(cpu_flags()) or '-'}, fp32")
    print(f"{'phase':32s} {'peak RssAnon MB':>16s} {'peak RSS MB':>12s} {'of which files':>15s}")
    for name, p in result["phases"].items():
        print(f"{name:32s} {p['RssAnon'] / 1024:16.0f} {p['VmRSS'] / 1024:12.0f} {p['RssFile'] / 1024:15.0f}")
    print(f"\ndata: {manifest['data']}")
    if args.curriculum:
        print(f"curriculum: {stages['curriculum']['stage_metrics']['scored']} texts scored, "
              f"{stages['curriculum']['stage_metrics']['blocks']} blocks packed by difficulty")
    print(f"pretrain: {stages['pretrain']['stage_metrics'].get('blocks')} blocks packed "
          f"({stages['pretrain']['stage_metrics']['order']}); cluster: "
          f"{cluster['texts']} texts, {cluster['embedded']} embedded at {cluster['embed_texts_per_s']:.0f} texts/s, "
          f"k={cluster['k']}, duplicates {cluster['duplicates']}")
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    corpus_mb = corpus["bytes"] / 1e6
    bound = args.bound_mb
    print(json.dumps({"bench": "large_corpus", "metric": "peak RssAnon MB (selftrain run, " + ("curriculum + paced " if args.curriculum else "")
                      + "pretrain + cluster)",
                      "value": round(peak_anon), "baseline": round(corpus_mb), "ratio": round(peak_anon / corpus_mb, 3),
                      "target": f"<= {bound:.0f} MB", "met": bool(peak_anon <= bound),
                      "peak_rss_mb": round(peak_rss), "documents": corpus["documents"]}))


if __name__ == "__main__":
    main()
