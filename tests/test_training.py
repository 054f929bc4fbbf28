"""selftrain.training: LoRA adapters (only the adapter trains; the saved model is plain), tracking
inside the stage directory, an explicit data order, masked LM, GRPO / DPO with an adapter, and the
data-order policies of selftrain.data.order."""

from __future__ import annotations

import pytest
import torch
from conftest import MICRO_ARCH, make_corpus, micro_config
from transformers import TrainerCallback

from selftrain.config import ModelConfig, config_from_dict
from selftrain.data.order import OrderOptions, order_of, pool_order
from selftrain.data.packing import pack_texts
from selftrain.data.pool import Pool, make_examples, to_dataset
from selftrain.errors import SelftrainError
from selftrain.modeling.factory import build_initial, load_checkpoint, save_checkpoint
from selftrain.stages.base import RunState
from selftrain.stages.pretrain import PretrainConfig, PretrainStage
from selftrain.training.adapters import LoraOptions, check_adapter
from selftrain.training.dpo import DPOOptions, dpo_train
from selftrain.training.grpo import GRPOOptions, grpo_train
from selftrain.training.lm import LMOptions, lm_train
from selftrain.training.sft import SFTOptions, sft_train

TEXTS = make_corpus(80).split("\n\n")
BERT_ARCH = {k: MICRO_ARCH[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "max_position_embeddings")}


def micro(preset: str = "tiny"):
    arch = MICRO_ARCH if preset == "tiny" else BERT_ARCH
    model, tok, _ = build_initial(ModelConfig(preset=preset, vocab_size=320, architecture=arch), TEXTS, 0)
    return model, tok


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class WeightsAtEnd(TrainerCallback):
    """The (still adapted) model's weights when training ends, before the adapter is merged."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}


class RecordInputs:
    """A forward pre-hook that keeps every training batch's input_ids rows (padding dropped)."""

    def __init__(self, model):
        self.rows: list[list[int]] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if module.training:
            ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
            for i, row in enumerate(ids.tolist()):
                keep = mask[i].tolist() if mask is not None else [1] * len(row)
                self.rows.append([t for t, m in zip(row, keep) if m])


# ---------------------------------------------------------------------- LoRA
def mean_loss(model, blocks) -> float:
    model.eval()
    with torch.no_grad():
        ids = torch.tensor(blocks["input_ids"])
        return float(model(input_ids=ids, labels=ids).loss)


def test_lora_trains_only_the_adapter_and_saves_a_plain_model(tmp_path):
    # A random model's tied embeddings are too small for any adapter to move its predictions far:
    # pretrain it briefly, then adapt it with LoRA to new text (the corpus with word order reversed).
    model, tok = micro()
    model, _ = lm_train(model, tok, pack_texts(TEXTS, tok, 32), LMOptions(max_steps=40, learning_rate=3e-3,
                                                                          save_steps=1000, precision="fp32"),
                        objective="clm", out_dir=tmp_path / "base", seed=0, device="cpu")
    start = snapshot(model)
    blocks = pack_texts([" ".join(reversed(t.split())) for t in TEXTS], tok, 32)
    before = mean_loss(model, blocks)
    opts = LMOptions(max_steps=30, batch_size=8, learning_rate=1e-2, logging_steps=5, save_steps=1000,
                     precision="fp32", adapter=LoraOptions(r=8, target_modules="all-linear"))
    end = WeightsAtEnd()
    trained, metrics = lm_train(model, tok, blocks, opts, objective="clm", out_dir=tmp_path / "trainer", seed=0,
                                device="cpu", callbacks=[end])
    # during training: only lora_A / lora_B were trainable, and every base weight stayed where it was
    assert end.trainable and all("lora_" in n for n in end.trainable)
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): w for n, w in end.weights.items()
            if "lora_" not in n}
    assert base.keys() <= start.keys() and all(torch.equal(w, start[n]) for n, w in base.items())
    assert any(w.abs().sum() > 0 for n, w in end.weights.items() if "lora_B" in n)  # B starts at zero
    # the loss falls with LoRA too
    after = mean_loss(trained, blocks)
    assert metrics["adapter"] == "lora" and after < before - 0.3, (before, after, metrics["loss_curve"])
    # merged: a plain model, saved as a plain directory whose attention weights moved
    assert type(trained).__name__ == "LlamaForCausalLM" and all(p.requires_grad for p in trained.parameters())
    save_checkpoint(trained, tok, tmp_path / "model")
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    loaded, _ = load_checkpoint(tmp_path / "model", "causal")
    saved = loaded.state_dict()
    assert set(saved) == set(start) and mean_loss(loaded, blocks) == pytest.approx(after, abs=1e-4)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(saved[q], start[q])
    assert torch.equal(saved["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # not adapted


def test_lora_run_resumes_from_its_checkpoint(tmp_path):
    model, tok = micro()
    blocks = pack_texts(TEXTS, tok, 32)
    adapter = LoraOptions(r=4)
    first = LMOptions(max_steps=2, batch_size=4, save_steps=2, logging_steps=1, precision="fp32", adapter=adapter)
    lm_train(model, tok, blocks, first, objective="clm", out_dir=tmp_path / "trainer", seed=0, device="cpu")
    assert (tmp_path / "trainer" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    model, _ = micro()  # a killed run starts again from the accepted model
    _, metrics = lm_train(model, tok, blocks, first.model_copy(update={"max_steps": 4}), objective="clm",
                          out_dir=tmp_path / "trainer", seed=0, device="cpu")
    assert metrics["resumed_from_step"] == 2 and [s for s, _ in metrics["loss_curve"]] == [1, 2, 3, 4]


def test_masked_lm_trains_with_lora_on_tiny_bert(tmp_path):
    model, tok = micro("tiny-bert")
    blocks = pack_texts(TEXTS, tok, 32, "mlm")
    opts = LMOptions(max_steps=6, batch_size=8, learning_rate=1e-2, logging_steps=2, save_steps=1000,
                     precision="fp32", adapter=LoraOptions())  # peft's defaults for BERT: query, value
    trained, metrics = lm_train(model, tok, blocks, opts, objective="mlm", out_dir=tmp_path / "t", seed=0,
                                device="cpu")
    assert type(trained).__name__ == "BertForMaskedLM" and metrics["train_loss"] > 0
    save_checkpoint(trained, tok, tmp_path / "model")
    assert type(load_checkpoint(tmp_path / "model", "masked")[0]).__name__ == "BertForMaskedLM"


def test_adapter_targets_are_checked_before_a_run(tmp_path):
    model, _ = micro()
    check_adapter(LoraOptions(target_modules=["q_proj", "down_proj"]), model)
    with pytest.raises(SelftrainError, match=r"\['qproj'\] match no module.*q_proj"):
        check_adapter(LoraOptions(target_modules=["qproj"]), model)
    with pytest.raises(ValueError, match="type"):
        LoraOptions(type="ia3")


def test_grpo_and_dpo_train_with_an_adapter(tmp_path):
    from selftrain.stages.selfplay.env import EnvMetrics

    class Env(EnvMetrics):
        def rollout(self, groups, g, backend, sampling):
            ids_in, ids_out = backend.generate_ids(["the cat"] * (groups * g), sampling)
            return {"prompt_ids": ids_in, "completion_ids": ids_out}

    def short(prompts, completions, completion_ids, **_):
        return [-len(ids) / 8 + (i % 3) for i, ids in enumerate(completion_ids)]

    model, tok = micro()
    start = snapshot(model)
    opts = GRPOOptions(max_steps=2, learning_rate=1e-2, groups_per_step=2, num_generations=4, completion_tokens=6,
                       temperature=1.0, beta=0.05, precision="fp32", adapter=LoraOptions(r=4))
    trained, records, _ = grpo_train(model, tok, Env(), {"short": (short, 1.0)}, opts=opts, out_dir=tmp_path / "g",
                                     seed=0)
    assert len(records) == 2 and type(trained).__name__ == "LlamaForCausalLM"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(trained.state_dict()[q], start[q])

    model, tok = micro()  # built in memory: no directory to load a reference copy from; LoRA needs none
    pairs = [{"prompt": t[:30], "chosen": t[30:60], "rejected": t[60:90]} for t in TEXTS[:8]]
    trained, records = dpo_train(model, tok, pairs, DPOOptions(max_steps=2, learning_rate=1e-2, batch_size=4,
                                                               precision="fp32", adapter=LoraOptions(r=4)),
                                 out_dir=tmp_path / "d", seed=0)
    assert len(records) == 2 and type(trained).__name__ == "LlamaForCausalLM"
    assert not torch.allclose(trained.state_dict()[q], start[q])
    assert not (tmp_path / "d").exists() and not (tmp_path / "g").exists()  # scratch folders removed


# ---------------------------------------------------------------------- data order
def test_lm_trains_blocks_in_the_given_order(tmp_path):
    model, tok = micro()
    blocks = pack_texts(TEXTS, tok, 16)
    order = [7, 3, 3, 0, 12, 5, 9, 1]  # repeats allowed: a weighted draw repeats rows
    recorder = RecordInputs(model)
    lm_train(model, tok, blocks, LMOptions(max_steps=4, batch_size=2, save_steps=1000, precision="fp32"),
             objective="clm", out_dir=tmp_path / "t", seed=0, device="cpu", order=order)
    recorder.handle.remove()
    assert recorder.rows == [blocks[i]["input_ids"] for i in order]


def test_sft_trains_pairs_in_the_given_order(tmp_path):
    model, tok = micro()
    prompts = [f"{t[:40]}\nLabel:" for t in TEXTS[:6]]
    completions = [" cat", " dog", " bird", " cat", " dog", " bird"]
    order = [4, 0, 5, 2, 1, 3]
    recorder = RecordInputs(model)
    sft_train(model, tok, prompts, completions, SFTOptions(max_steps=3, batch_size=2, precision="fp32"),
              out_dir=tmp_path / "s", seed=0, device="cpu", order=order)
    recorder.handle.remove()
    from selftrain.training.sft import tokenize_pairs

    rows = tokenize_pairs(tok, prompts, completions, 512, append_eos=True)["input_ids"]
    assert recorder.rows == [rows[i] for i in order]


def test_an_order_naming_a_missing_row_is_refused(tmp_path):
    model, tok = micro()
    blocks = pack_texts(TEXTS, tok, 16)
    with pytest.raises(SelftrainError, match="names row"):
        lm_train(model, tok, blocks, LMOptions(max_steps=1), objective="clm", out_dir=tmp_path / "t", seed=0,
                 device="cpu", order=[0, len(blocks)])


def test_order_policies():
    values = [3.0, None, 1.0, 2.0, 1.0]
    assert order_of(values, "random", 0) is None
    assert order_of(values, "ascending", 0) == [2, 4, 3, 0, 1]  # ties keep pool order; unannotated last
    assert order_of(values, "descending", 0) == [0, 3, 2, 4, 1]
    drawn = order_of([0, 1, 0, 3], "weighted", 0)
    assert len(drawn) == 4 and set(drawn) <= {1, 3}  # weight 0 is never drawn
    many = [i for seed in range(100) for i in order_of([1, 0, 0, 3], "weighted", seed)]
    assert 2 < many.count(3) / many.count(0) < 4  # drawn in proportion to the weights (3 : 1)
    with pytest.raises(SelftrainError, match=">= 0"):
        order_of([1, -1], "weighted", 0)
    ds = to_dataset(make_examples(["a", "b", "c"], origin="real", op="original", stage="data", round=0))
    ds = ds.add_column("difficulty", [2, 0, 1])
    assert pool_order(ds, OrderOptions(policy="descending", column="difficulty"), 0, rows=[1, 2]) == [1, 0]
    with pytest.raises(SelftrainError, match="'weight' is not a pool column"):
        pool_order(ds, OrderOptions(policy="weighted", column="weight"), 0)
    with pytest.raises(ValueError, match="needs order.column"):
        OrderOptions(policy="ascending")


# ---------------------------------------------------------------------- through the pretrain stage
def stage_state(tmp_path, pool_ds, **run) -> RunState:
    model, tok = micro()
    ckpt = save_checkpoint(model, tok, tmp_path / "start")
    cfg = config_from_dict(micro_config(tmp_path / "run", tmp_path / "corpus.txt", ["pretrain"], run=run))
    stage_dir = tmp_path / "run" / "stages" / "r1-01-pretrain"
    stage_dir.mkdir(parents=True)
    return RunState(config=cfg, checkpoint=ckpt, kind="causal", pool=Pool(pool_ds), heldout=[], seed=0,
                    stage_key="r1-01-pretrain", stage_dir=stage_dir)


def pool_of(texts):
    return to_dataset(make_examples(texts, origin="real", op="original", stage="data", round=0))


def test_tensorboard_logs_land_inside_the_stage_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would show here
    state = stage_state(tmp_path, pool_of(TEXTS), report_to="tensorboard")
    config = PretrainConfig(max_steps=4, block_size=32, batch_size=4, logging_steps=1, save_steps=2, precision="fp32")
    result = PretrainStage().run(state, config)
    events = list((state.stage_dir / "tracking").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert not (tmp_path / "runs").exists() and not (state.stage_dir / "trainer").exists()
    assert result.checkpoint == state.stage_dir / "model"


def test_pretrain_order_sorts_texts_by_a_pool_column(tmp_path, monkeypatch):
    texts = TEXTS[:40]
    ds = pool_of(texts).add_column("difficulty", [len(t) for t in texts])
    state = stage_state(tmp_path, ds)
    seen = []
    import selftrain.stages.pretrain as stage

    real_pack = stage.pack_batches

    def packed(batches, *a, **k):
        seen.append([t for batch in batches for t in batch])
        return real_pack([seen[-1]], *a, **k)

    monkeypatch.setattr(stage, "pack_batches", packed)
    config = PretrainConfig(max_steps=1, block_size=32, batch_size=2, save_steps=1000, precision="fp32",
                            order={"policy": "descending", "column": "difficulty"})
    result = PretrainStage().run(state, config)
    assert seen == [sorted(texts, key=len, reverse=True)] and result.metrics["order"] == "descending"
    missing = config.model_copy(update={"order": OrderOptions(policy="ascending", column="cluster")})
    with pytest.raises(SelftrainError, match="'cluster' is not a pool column"):
        PretrainStage().run(state, missing)


def test_trainer_args_may_not_set_what_the_run_sets():
    with pytest.raises(ValueError, match="run.report_to"):
        PretrainConfig(trainer_args={"report_to": "tensorboard"})
    with pytest.raises(ValueError, match="pretrain.learning_rate"):
        PretrainConfig(trainer_args={"learning_rate": 1.0})
    assert PretrainConfig(adapter={"type": "lora", "r": 4}).adapter.r == 4


def test_selfplay_spin_with_an_adapter_through_the_runner(tmp_path):
    """The stage's adapter option and run.report_to reach DPO; the committed model is a plain one."""
    from selftrain.runner import Runner

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    stage = {"selfplay": {"env": "spin", "num_prompts": 8, "max_steps": 2, "batch_size": 4, "prefix_tokens": 8,
                          "continuation_tokens": 8, "precision": "fp32", "learning_rate": 1e-3,
                          "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj", "o_proj"]}}}
    cfg = micro_config(tmp_path / "run", corpus, [stage], guard={"tolerance": 10.0}, run={"report_to": "tensorboard"})
    manifest = Runner(config_from_dict(cfg)).run()
    (entry,) = manifest["stages"]
    assert entry["status"] == "accepted", entry
    stage_dir = tmp_path / "run" / "stages" / entry["key"]
    assert list((stage_dir / "tracking" / "dpo-1").glob("events.out.tfevents.*"))
    model, _ = load_checkpoint(tmp_path / "run" / "final", "causal")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_grpo_with_an_mle_term_learns_the_real_text_too(tmp_path):
    """A reward that says nothing (every sample alike) leaves only the maximum-likelihood term:
    the LM loss of the real blocks, logged each step, falls."""
    from selftrain.training.grpo import EnvMetrics, MLETerm

    class Env(EnvMetrics):
        def rollout(self, groups, g, backend, sampling):
            ids_in, ids_out = backend.generate_ids(["the cat"] * (groups * g), sampling)
            return {"prompt_ids": ids_in, "completion_ids": ids_out}

    model, tok = micro()
    blocks = [ids[:16] for ids in tok(TEXTS, add_special_tokens=False)["input_ids"] if len(ids) >= 16]
    opts = GRPOOptions(max_steps=8, learning_rate=1e-2, groups_per_step=2, num_generations=4, completion_tokens=4,
                       temperature=1.0, precision="fp32", lr_scheduler="constant")
    _, records, _ = grpo_train(model, tok, Env(), {"flat": (lambda prompts, completions, **_: [1.0] * len(completions), 1.0)},
                               opts=opts, out_dir=tmp_path / "g", seed=0, mle=MLETerm(blocks, weight=1.0, batch_size=8))
    losses = [r["mle_loss"] for r in records]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5, losses
