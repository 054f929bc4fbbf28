"""Stage `pretrain` — self-supervised learning: the text labels itself.

Causal LM predicts each next token; masked LM hides 15% of tokens and predicts them. Text from
the pool is packed into fixed blocks and trained with ``transformers.Trainer`` (through
``selftrain.training.lm``), so accelerate, DDP, FSDP and DeepSpeed apply unchanged
(``trainer_args`` passes any TrainingArguments field). Trainer checkpoints land in the stage
directory; a killed run resumes from the last complete one.

``order`` chooses the data order: random (shuffled blocks), ascending / descending by a pool
annotation column (texts sorted before packing, blocks trained in turn), weighted draws of
texts by a column, or paced: a curriculum on a column (``selftrain.training.curriculum``). With
no ``order`` of its own, a stage after an accepted ``curriculum`` stage trains under its pacing. ``adapter`` trains a LoRA adapter instead of every weight, merged on save.
"""

from __future__ import annotations

import shutil
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from selftrain.data.arrowfile import text_batches
from selftrain.data.order import OrderOptions, column_values, inherited_order, pool_order
from selftrain.data.packing import pack_batches
from selftrain.errors import SelftrainError
from selftrain.modeling.factory import save_checkpoint
from selftrain.stages.base import RunState, Stage, StageConfig, StageResult, fmt, register
from selftrain.training.adapters import check_adapter
from selftrain.training.curriculum import draw_curriculum, paced_lm_train
from selftrain.training.lm import LMOptions, check_lm_input, lm_train


class PretrainConfig(StageConfig, LMOptions):
    option_prefix: ClassVar[str] = "pretrain."

    objective: Literal["auto", "clm", "mlm"] = Field(
        "auto", description="clm (next token) or mlm (masked tokens); auto follows the model type.")
    block_size: int = Field(128, ge=8, description="Tokens per packed training block.")
    data: Literal["pool", "real"] = Field("pool", description="Train on the whole pool or only real text.")
    order: OrderOptions = Field(default_factory=OrderOptions,
                                description="Data order: {policy: random|ascending|descending|weighted|paced, column: <pool column>, "
                                            "pacing options when paced}; unset: the curriculum's pacing if one ran.")


@register
class PretrainStage(Stage):
    name = "pretrain"
    Config = PretrainConfig

    @staticmethod
    def objective(config: PretrainConfig, kind: str) -> str:
        if config.objective == "auto":
            return "mlm" if kind == "masked" else "clm"
        if (config.objective == "mlm") != (kind == "masked"):
            raise SelftrainError(f"pretrain.objective={config.objective} does not fit a {kind} model "
                                 "(clm needs a causal LM, mlm an encoder such as preset tiny-bert)")
        return config.objective

    def preflight(self, config, *, model, tokenizer, kind, train_texts):
        objective = self.objective(config, kind)
        if config.order.policy == "paced" and objective != "clm" and (
                config.order.length_warmup is not None or config.order.rescore_every is not None):
            raise SelftrainError("pretrain.order: length_warmup and rescore_every need a causal LM (clm)")
        check_adapter(config.adapter, model)
        check_lm_input(config, model, tokenizer, train_texts, config.block_size)

    def run(self, state: RunState, config: PretrainConfig) -> StageResult:
        objective = self.objective(config, state.kind)
        model, tokenizer = state.load_model()
        ds = state.pool.ds
        rows = np.arange(len(ds)) if config.data == "pool" else state.pool.positions("real")
        trainer_dir = state.stage_dir / "trainer"
        given = "order" in config.model_fields_set
        options = inherited_order(config.order, given, state.artefacts)
        if not given and objective != "clm":  # a published pacing's LM-only options do not apply to mlm
            options = options.model_copy(update={"rescore_every": None, "length_warmup": None})
        if options.policy == "paced":
            model, metrics = paced_lm_train(
                model, tokenizer, ds.select_columns(["text"]).select(rows), column_values(ds, options.column, rows),
                config, options, block_size=config.block_size, objective=objective, out_dir=trainer_dir,
                seed=state.seed, device=state.device, log=state.log, stage_key=state.stage_key,
                report_to=state.config.run.report_to, blocks_path=state.stage_dir / "blocks.arrow")
        else:
            order = pool_order(ds, options, state.seed, rows)  # positions into rows; None: random
            if order is not None:
                rows = rows[order]
            chosen = ds if order is None and len(rows) == len(ds) else ds.select(rows)
            # streamed from the memory-mapped pool to a block file: the corpus need not fit in memory
            blocks = pack_batches(text_batches(chosen, size=2000), tokenizer, config.block_size, objective,
                                  path=state.stage_dir / "blocks.arrow")
            model, metrics = lm_train(model, tokenizer, blocks, config, objective=objective, out_dir=trainer_dir,
                                      seed=state.seed, device=state.device, log=state.log, stage_key=state.stage_key,
                                      report_to=state.config.run.report_to,
                                      order=None if order is None else range(len(blocks)))  # packed in order: in turn
            metrics["blocks"] = len(blocks)
        model_dir = save_checkpoint(model, tokenizer, state.stage_dir / "model")
        shutil.rmtree(trainer_dir, ignore_errors=True)  # the saved model supersedes them
        (state.stage_dir / "blocks.arrow").unlink(missing_ok=True)
        artefacts = {}
        if options.policy == "paced":
            artefacts = draw_curriculum(metrics, state.stage_dir / "competence.png", state.stage_dir / "bucket_loss.png")
        return StageResult(checkpoint=model_dir, artefacts=artefacts,
                           metrics={"objective": objective, "order": options.policy, **metrics})

    def report(self, entry: dict) -> str:
        m = entry["stage_metrics"]
        if "objective" not in m:
            return ""
        how = f"LoRA adapter ({m['adapter']}, merged)" if m.get("adapter") else "every weight trained"
        resumed = f"; resumed from step {m['resumed_from_step']}" if m.get("resumed_from_step") else ""
        order = m.get("order", "random")
        if order == "paced":
            p = m["pacing"]
            order = f"paced ({p['pacing']}, {p['direction']}, c0 {p['c0']}, ramp {p['ramp']})"
        text = (f"{m['objective']} on {m['blocks']} packed blocks, order {order}, {how}, "
                f"{m.get('precision')}: logged loss {fmt(m.get('first_logged_loss'), 3)} -> "
                f"{fmt(m.get('last_logged_loss'), 3)}, {fmt(m.get('train_tokens_per_s'), 0)} tokens/s{resumed}.")
        arts = entry.get("artefacts") or {}
        for name, title in (("curriculum_competence", "competence"), ("curriculum_bucket_loss", "loss per bucket")):
            if name in arts:
                text += f"\n\n![{title}]({arts[name]})"
        return text
