"""Stage `fewshot` — pseudo-label self-training from label names only.

The model labels unlabelled texts zero-shot (log-likelihood of each label name after the task's
prompt). The confident, class-balanced part of its own predictions becomes fine-tuning data
(prompt -> label, loss on the label only), and the loop repeats with the improved model.
Confidence is calibrated without labels: each label's probability is divided by its mean over
the unlabelled set, which removes the prompt's prior for one label (contextual calibration).

More rounds are not always better: on BBC topics a second round lowered measured accuracy
(0.70 -> 0.66) while the selected labels' mean confidence reached 1.000. So from round 2 on the
loop stops, before fine-tuning, on signals the model can see without labels: saturated
confidence of the selected labels, or labels that agree with the previous round's.

Gold labels are never read for training. With ``inputs: task``, a seeded share of the task's
rows is set aside and its labels only *measure* accuracy before and after each round.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from rich.console import Console

from selftrain import distributed
from selftrain.data.pool import example_id, make_examples
from selftrain.data.sources import load_documents
from selftrain.errors import SelftrainError
from selftrain.evaluation.harness import (
    answer_prefix,
    build_prompt,
    choice_logprobs,
    evaluate_task,
)
from selftrain.modeling.chat import use_chat
from selftrain.modeling.factory import save_checkpoint
from selftrain.stages.base import RunState, Stage, StageConfig, StageResult, fmt, register
from selftrain.tasks import TaskSpec, load_task
from selftrain.training.adapters import check_adapter
from selftrain.training.sft import SFTOptions, paced_by_curriculum, sft_train


class FewshotConfig(StageConfig):
    task: str = Field(..., description="A multiple_choice task: its prompt template and label names are used.")
    labels: list[str] | None = Field(None, description="Label names; default: the task's fixed choices.")
    inputs: str = Field("pool", description="Unlabelled texts: pool (the run's real text), task (the task's "
                        "rows, labels dropped), or a file / folder / jsonl path.")
    text_column: str = Field("text", description="Column of a jsonl/csv inputs file that holds the text.")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="inputs=task: share of rows kept aside to measure.")
    eval_limit: int | None = Field(300, ge=1, description="Measured rows at most (null for all).")
    max_inputs: int | None = Field(1000, ge=1, description="Unlabelled texts labelled per round at most.")
    rounds: int = Field(2, ge=1, description="Label -> select -> fine-tune iterations, at most (see stop_*).")
    stop_confidence: float | None = Field(
        0.995, gt=0, le=1, description="From round 2: stop before a round whose selected pseudo-labels' mean "
        "confidence reaches this (saturated: they teach certainty, not labels); null: never.")
    stop_agreement: float | None = Field(
        0.98, gt=0, le=1, description="From round 2: stop before a round whose labels agree with the last round's "
        "on at least this share of the texts both labelled (settled: another round repeats them); null: never.")
    per_class: int = Field(32, ge=1, description="Pseudo-labelled examples kept per label per round.")
    min_confidence: float = Field(0.0, ge=0, le=1, description="Drop predictions below this (calibrated) probability.")
    calibrate: bool = Field(True, description="Divide each label's probability by its mean over the unlabelled set.")
    chat: bool | Literal["auto"] = Field(False, description="Wrap prompts in the tokenizer's chat template.")
    batch_size: int = Field(8, ge=1, description="Prompts per scoring pass.")
    add_to_pool: bool = Field(True, description="Add the pseudo-labelled prompts to the pool (origin fewshot).")
    train: SFTOptions = Field(default_factory=lambda: SFTOptions(max_steps=30, learning_rate=1e-4),
                              description="Fine-tuning on the pseudo-labels (each round continues the last).")


def label_task(task_ref: str, labels: list[str] | None) -> TaskSpec:
    task = load_task(task_ref)
    if task.output_type != "multiple_choice":
        raise SelftrainError(f"fewshot: task {task.name} is {task.output_type}; pseudo-labelling needs "
                             "multiple_choice with a fixed label set")
    if labels is not None:
        task = task.model_copy(update={"doc_to_choice": list(labels)})
    if not isinstance(task.doc_to_choice, list):
        raise SelftrainError(f"fewshot: task {task.name} has per-row choices; give fewshot.labels")
    if len(set(task.doc_to_choice)) < 2:
        raise SelftrainError(f"fewshot: the label set {task.doc_to_choice} has fewer than 2 labels; "
                             "there is nothing to choose between")
    if not task.input_field:
        raise SelftrainError(f"fewshot: task {task.name} names no input_field to put the unlabelled text in")
    return task


def split_task_rows(task: TaskSpec, fraction: float, seed: int) -> tuple[list[str], list[dict]]:
    """(unlabelled texts, measured rows): a seeded hash split; the first side keeps only text."""
    unlabelled, measured = [], []
    for n, row in enumerate(task.docs(), 1):
        if task.input_field not in row:
            raise SelftrainError(f"fewshot: task {task.name}, row {n} has no field {task.input_field!r} "
                                 f"(its input_field); it has {sorted(row)}")
        text = str(row[task.input_field])
        if _unit(text, seed) < fraction:
            measured.append(row)
        else:
            unlabelled.append(text)
    return unlabelled, measured


def _unit(text: str, seed: int) -> float:
    return int(example_id(text, f"fewshot-split-{seed}"), 16) / 16**16


def predict(model, tokenizer, task: TaskSpec, texts: list[str], *, calibrate: bool, chat: bool,
            batch_size: int, progress: bool = False) -> tuple[list[int], list[float], torch.Tensor]:
    """Zero-shot label index, its (calibrated) probability, and all probabilities, for each text.

    Only the texts and the label names reach this function: there is no way for a gold label in.
    """
    labels = list(task.doc_to_choice)
    prompts = [prompt_for(task, t, tokenizer, chat) for t in texts]
    with torch.no_grad():
        lp = torch.tensor(choice_logprobs(model, tokenizer, task, prompts, [labels] * len(texts), chat=chat,
                                          batch_size=batch_size, progress=progress))
    probs = lp.softmax(-1)
    if calibrate:  # P(label | x) / mean_x P(label | x): no label is favoured just by the prompt
        probs = probs / probs.mean(0, keepdim=True)
        probs = probs / probs.sum(-1, keepdim=True)
    conf, pred = probs.max(-1)
    return pred.tolist(), conf.tolist(), probs


def prompt_for(task: TaskSpec, text: str, tokenizer, chat: bool) -> str:
    return build_prompt(task, task.text({task.input_field: text}), [], tokenizer, chat)


def select_balanced(pred: list[int], conf: list[float], n_labels: int, per_class: int,
                    min_confidence: float) -> list[int]:
    """Indices of the ``per_class`` most confident predictions of each label."""
    chosen = []
    for c in range(n_labels):
        ranked = sorted((i for i, p in enumerate(pred) if p == c and conf[i] >= min_confidence),
                        key=lambda i: -conf[i])
        chosen += ranked[:per_class]
    return sorted(chosen)


def self_train(model, tokenizer, task: TaskSpec, texts: list[str], cfg: FewshotConfig, *, seed: int,
               device: str, work_dir: Path, log=lambda r: None, stage_key: str = "fewshot",
               measured: list[dict] | None = None, console=None, report_to: str = "none"):
    """The whole loop; returns (model, selected examples, per-round history).

    ``measured`` rows (with gold labels) are only scored, before and after each round.
    """
    chat = use_chat(cfg.chat, tokenizer)
    labels = list(task.doc_to_choice)
    history: list[dict] = []
    selected_all: list[dict] = []

    def measure() -> float | None:
        if not measured:
            return None
        return evaluate_task(model, tokenizer, task, 0, docs=measured, batch_size=cfg.batch_size,
                             chat=chat).metrics["acc"]

    acc = measure()
    history.append({"round": 0, "accuracy": acc})
    if console is not None and acc is not None:
        console.print(f"  zero-shot accuracy on {len(measured)} set-aside rows: {acc:.3f}")
    previous: dict[int, int] = {}  # text index -> label, from the last round's labelling
    for rnd in range(1, cfg.rounds + 1):
        rng = random.Random(seed * 7919 + rnd)
        drawn = rng.sample(range(len(texts)), cfg.max_inputs) if cfg.max_inputs and len(texts) > cfg.max_inputs \
            else list(range(len(texts)))
        pool = [texts[i] for i in drawn]
        pred, conf, _ = predict(model, tokenizer, task, pool, calibrate=cfg.calibrate, chat=chat,
                                batch_size=cfg.batch_size, progress=console is not None)
        picked = select_balanced(pred, conf, len(labels), cfg.per_class, cfg.min_confidence)
        if not picked:
            raise SelftrainError(f"fewshot round {rnd}: no prediction reached min_confidence="
                                 f"{cfg.min_confidence}; lower it")
        mean_confidence = sum(conf[i] for i in picked) / len(picked)
        both = [(previous[t], p) for t, p in zip(drawn, pred) if t in previous]
        agreement = sum(a == b for a, b in both) / len(both) if both else None
        previous = dict(zip(drawn, pred))
        why = distributed.broadcast(stop_reason(cfg, rnd, mean_confidence, agreement))  # every rank stops together
        if why:  # the last round's model is kept
            history.append({"round": rnd, "stopped": why, "mean_confidence": mean_confidence, "agreement": agreement,
                            "labelled": len(pool)})
            log({"stage": stage_key, "phase": "fewshot", "round": rnd, "stopped": 1,
                 "mean_confidence": mean_confidence, "agreement": agreement})
            if console is not None:
                console.print(f"  round {rnd}: stopped before fine-tuning: {why}")
            break
        prompts = [prompt_for(task, pool[i], tokenizer, chat) for i in picked]
        completions = [answer_prefix(task, chat) + labels[pred[i]] for i in picked]
        model, train_metrics = sft_train(model, tokenizer, prompts, completions, cfg.train,
                                         out_dir=work_dir / f"sft-round{rnd}", seed=seed + rnd, device=device,
                                         log=log, stage_key=stage_key, append_eos=False, report_to=report_to)
        model.to(device)
        for i, p, c in zip(picked, prompts, completions):
            selected_all.append({"text": p + c, "label": labels[pred[i]], "confidence": round(conf[i], 4),
                                 "round": rnd, "source_id": example_id(pool[i]), "input": pool[i], "completion": c})
        acc = measure()
        counts = {lab: sum(1 for i in picked if pred[i] == j) for j, lab in enumerate(labels)}
        record = {"round": rnd, "accuracy": acc, "labelled": len(pool), "selected": len(picked),
                  "selected_per_label": counts, "mean_confidence": mean_confidence, "agreement": agreement,
                  "predicted_share": {lab: pred.count(j) / len(pred) for j, lab in enumerate(labels)},
                  **train_metrics}
        history.append(record)
        log({"stage": stage_key, "phase": "fewshot", **{k: v for k, v in record.items()
                                                        if isinstance(v, (int, float)) or v is None}})
        if console is not None:
            shown = "-" if acc is None else f"{acc:.3f}"
            console.print(f"  round {rnd}: {len(picked)} pseudo-labels {counts}; measured accuracy {shown}")
    return model, selected_all, history


def stop_reason(cfg: FewshotConfig, rnd: int, mean_confidence: float, agreement: float | None) -> str | None:
    """Why round ``rnd`` should not fine-tune (from round 2 on), from label-free signals only."""
    if rnd < 2:
        return None
    if cfg.stop_confidence is not None and mean_confidence >= cfg.stop_confidence:
        return (f"the selected labels' mean confidence {mean_confidence:.4f} reached stop_confidence="
                f"{cfg.stop_confidence:g} (saturated)")
    if cfg.stop_agreement is not None and agreement is not None and agreement >= cfg.stop_agreement:
        return f"{agreement:.1%} of labels agree with the last round's (stop_agreement={cfg.stop_agreement:g})"
    return None


@register
class FewshotStage(Stage):
    name = "fewshot"
    Config = FewshotConfig
    requires_causal = True  # scores label names as continuations

    def _inputs(self, cfg: FewshotConfig, task: TaskSpec, pool_texts: Sequence[str], seed: int):
        if cfg.inputs == "pool":
            return pool_texts, None
        if cfg.inputs == "task":
            unlabelled, measured = split_task_rows(task, cfg.eval_fraction, seed)
            return unlabelled, measured[:cfg.eval_limit] if cfg.eval_limit else measured
        return [t for _, t in load_documents(cfg.inputs, text_column=cfg.text_column)], None

    def preflight(self, config, *, model, tokenizer, kind, train_texts):
        check_adapter(config.train.adapter, model)
        task = label_task(config.task, config.labels)
        texts, _ = self._inputs(config, task, train_texts, 0)
        if not texts:
            raise SelftrainError(f"fewshot: the unlabelled set ({config.inputs}) is empty")
        chat = use_chat(config.chat, tokenizer)
        try:
            prompt_for(task, texts[0], tokenizer, chat)
        except SelftrainError as e:
            raise SelftrainError(f"fewshot fills only the task's input_field ({task.input_field!r}), so its prompt "
                                 f"must render from that field alone: {e}") from None

    def run(self, state: RunState, config: FewshotConfig) -> StageResult:
        task = label_task(config.task, config.labels)
        # the split seed is the run's, not the round's: the measured rows stay the same every round
        texts, measured = self._inputs(config, task, state.pool.text_view(origin="real"), state.config.run.seed)
        if not texts:
            raise SelftrainError(f"fewshot: the unlabelled set ({config.inputs}) is empty")
        model, tokenizer = state.load_model()
        config = config.model_copy(update={"train": paced_by_curriculum(config.train, state.artefacts)})
        model, selected, history = self_train(model, tokenizer, task, texts, config, seed=state.seed,
                                              device=state.device, work_dir=state.stage_dir, log=state.log,
                                              stage_key=state.stage_key, measured=measured,
                                              console=Console(stderr=True), report_to=state.config.run.report_to)
        model_dir = save_checkpoint(model.cpu(), tokenizer, state.stage_dir / "model")
        additions = []
        if config.add_to_pool:
            additions = make_examples([s["text"] for s in selected], origin="fewshot", op="pseudo_label",
                                      stage=state.stage_key, round=state.round,
                                      parent_ids=[s["source_id"] for s in selected],
                                      metas=[{k: s[k] for k in ("label", "confidence", "round", "input", "completion")}
                                             for s in selected])
        metrics = {"task": task.name, "unlabelled": len(texts), "measured": len(measured or []),
                   "history": history, "pseudo_labels": len(selected)}
        trained = [h for h in history if "stopped" not in h]
        if measured:  # the stage's own target: the guard asks it to rise (labels only measure)
            metrics.update(accuracy_before=history[0]["accuracy"], accuracy_after=trained[-1]["accuracy"],
                           target={"metric": f"{task.name} set-aside accuracy", "before": history[0]["accuracy"],
                                   "after": trained[-1]["accuracy"], "mode": "max"})
        stopped = [h for h in history if "stopped" in h]
        if stopped:
            metrics["stopped"] = stopped[0]["stopped"]
        return StageResult(checkpoint=model_dir, additions=additions, metrics=metrics)

    def report(self, entry: dict) -> str:
        m = entry["stage_metrics"]
        if not m.get("history"):
            return ""
        lines = [f"Pseudo-label self-training on `{m.get('task')}`: {m.get('unlabelled')} unlabelled texts; accuracy "
                 f"measured on {m.get('measured')} rows set aside (their labels only measure).", "",
                 "| round | pseudo-labels | per label | mean confidence | measured accuracy |",
                 "|---|---|---|---|---|"]
        for h in m["history"]:
            per = ", ".join(f"{k} {v}" for k, v in (h.get("selected_per_label") or {}).items())
            if "stopped" in h:
                per = f"stopped before fine-tuning: {h['stopped']}"
            lines.append(f"| {h['round']} | {h.get('selected', '-')} | {per or '-'} | "
                         f"{fmt(h.get('mean_confidence'), 3)} | {fmt(h.get('accuracy'), 3)} |")
        return "\n".join(lines)
