"""Curriculum learning: the pacing sampler draws only what competence allows, the scorers rank
what they claim to, self-paced re-scoring and resume keep the schedule, and the `curriculum`
stage scores the pool, trains easy to hard and hands its pacing to the stages after it."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import TrainerCallback

import selftrain.training.curriculum as curriculum_mod
from selftrain.config import ModelConfig, config_from_dict
from selftrain.data.pacing import PacedSampler, PacingOptions, competence, length_at, rank_rows
from selftrain.data.packing import pack_texts
from selftrain.data.pool import Pool
from selftrain.errors import SelftrainError
from selftrain.evaluation import difficulty as scorers
from selftrain.modeling.factory import build_initial
from selftrain.modeling.scoring import sequence_losses
from selftrain.runner import Runner
from selftrain.stages.base import stage_specs
from selftrain.tasks.families import make_family
from selftrain.training.curriculum import LengthWarmupCollator, paced_lm_train
from selftrain.training.lm import LMOptions
from selftrain.training.sampling import check_order
from selftrain.training.sft import SFTOptions, completion_curriculum, paced_by_curriculum, sft_train
from tests.conftest import MICRO_ARCH, make_corpus, micro_config, pretrain

PACINGS = ["linear", "sqrt", "exponential", "baby_steps"]
BERT_ARCH = {k: v for k, v in MICRO_ARCH.items() if k != "num_key_value_heads"}


def sampler(pacing="sqrt", n=200, steps=50, per_step=8, seed=0, **kw):
    difficulty = [float(d) for d in random.Random(seed + 99).sample(range(n), n)]  # distinct: rank = value
    return difficulty, PacedSampler(difficulty, PacingOptions(pacing=pacing, **kw), total_steps=steps,
                                    per_step=per_step, seed=seed)


# ---------------------------------------------------------------------------- pacing
@pytest.mark.parametrize("pacing", PACINGS)
@pytest.mark.parametrize("direction", ["easy_first", "hard_first"])
def test_every_draw_lies_within_the_current_competence(pacing, direction):
    difficulty, s = sampler(pacing, c0=0.05, ramp=0.6, direction=direction)
    n = len(difficulty)
    opened = []
    for step in range(s.total_steps):
        k = s.open_rows(step)
        assert k == max(1, math.ceil(competence(step, s.total_steps, s.options) * n - 1e-9))
        rows = s.draw(step)
        assert len(rows) == s.per_step
        # rank by value: easy_first opens the k smallest difficulties, hard_first the k largest
        ranks = [difficulty[r] if direction == "easy_first" else n - 1 - difficulty[r] for r in rows]
        assert max(ranks) < k, (step, k, max(ranks))
        opened.append(k)
    assert opened == sorted(opened) and opened[0] < n and opened[-1] == n  # grows to everything
    assert opened[int(0.6 * s.total_steps)] == n  # fully open once the ramp is over


def test_competence_curves_start_at_c0_and_reach_one_at_the_ramp():
    for pacing in ("linear", "sqrt", "exponential"):
        opts = PacingOptions(pacing=pacing, c0=0.2, ramp=0.5)
        assert competence(0, 100, opts) == pytest.approx(0.2)
        assert competence(50, 100, opts) == pytest.approx(1.0) and competence(99, 100, opts) == 1.0
    at = lambda p: competence(25, 100, PacingOptions(pacing=p, c0=0.2, ramp=0.5))  # noqa: E731
    assert at("exponential") < at("linear") < at("sqrt")  # slow, straight, fast openers
    steps = [competence(t, 100, PacingOptions(pacing="baby_steps", buckets=4, ramp=1.0)) for t in range(100)]
    assert sorted(set(steps)) == [0.25, 0.5, 0.75, 1.0]  # four discrete buckets
    assert competence(0, 100, PacingOptions(pacing="none")) == 1.0


def test_none_is_a_fresh_permutation_every_pass():
    _, s = sampler("none", n=40, steps=20, per_step=8)  # 160 draws: four passes over 40 rows
    drawn = list(s)
    for p in range(4):
        assert sorted(drawn[40 * p:40 * (p + 1)]) == list(range(40))
    assert drawn[:40] != drawn[40:80] and drawn[:40] != list(range(40))


def test_anti_curriculum_reverses_the_ranking():
    difficulty = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    easy = rank_rows(difficulty, "easy_first", 0)
    assert easy == [1, 3, 5, 0, 2, 4]
    assert rank_rows(difficulty, "hard_first", 0) == easy[::-1]
    _, s = sampler("linear", c0=0.1, direction="hard_first")
    assert {s.difficulty[r] for r in s.draw(0)} <= set(sorted(s.difficulty)[-s.open_rows(0):])


def test_ties_and_missing_difficulty_rank_by_seed_not_pool_order():
    difficulty = [1.0] * 50 + [None] * 5
    ranked = rank_rows(difficulty, "easy_first", 3)
    assert ranked[-5:] != list(range(50, 55)) and set(ranked[-5:]) == set(range(50, 55))  # missing last
    assert ranked[:50] != list(range(50)) and ranked == rank_rows(difficulty, "easy_first", 3)


def test_seeds_reproduce_and_differ():
    assert list(sampler(seed=1)[1]) == list(sampler(seed=1)[1])
    assert list(sampler(seed=1)[1]) != list(sampler(seed=2)[1])


def test_resume_continues_the_schedule_where_it_stopped():
    """A resumed trainer skips the batches already trained and goes on: given the ranking history
    the checkpoint saved, the steps after the cut draw exactly what the uninterrupted run drew."""
    difficulty, whole = sampler("sqrt", steps=30)
    new = [float(x) for x in random.Random(5).sample(range(200), 200)]
    first = [whole.draw(t) for t in range(12)]
    whole.rescore(new, from_step=12)  # re-scored at step 10, in force from 12
    assert [whole.draw(t) for t in range(12)] == first  # steps already drawn keep their rows
    resumed = PacedSampler(difficulty, whole.options, total_steps=30, per_step=8, seed=0, history=whole.history)
    assert [resumed.draw(t) for t in range(30)] == [whole.draw(t) for t in range(30)]
    assert whole.draw(12) != PacedSampler(difficulty, whole.options, total_steps=30, per_step=8, seed=0).draw(12)
    assert len(list(resumed)) == len(resumed) == 30 * 8


def test_a_constant_ranking_draws_in_random_order_until_a_rescore():
    s = PacedSampler([1.0] * 40, PacingOptions(pacing="linear", c0=0.1), total_steps=10, per_step=8, seed=0)
    assert sorted(sum((s.draw(t) for t in range(5)), [])) == list(range(40))  # a permutation, not a subset
    s.rescore([float(i) for i in range(40)], from_step=5)
    assert max(s.draw(5)) < s.open_rows(5)  # ranked from there on: only the easiest open rows


def test_sequence_length_warmup_splits_blocks_without_losing_tokens():
    opts = PacingOptions(length_warmup=8, ramp=0.5)
    lengths = [length_at(t, 100, 64, opts) for t in range(100)]
    assert lengths[0] == 8 and lengths[50:] == [64] * 50 and lengths == sorted(lengths)
    assert all(64 % n == 0 for n in lengths)
    collator = LengthWarmupCollator(lambda step: length_at(step, 100, 64, opts), micro_per_step=2)
    rows = [{"input_ids": list(range(i, i + 64))} for i in range(4)]
    batch = collator(rows)
    assert batch["input_ids"].shape == (32, 8) and batch["input_ids"].flatten().tolist() == sum((r["input_ids"] for r in rows), [])
    assert collator(rows)["input_ids"].shape == (32, 8)  # the second micro-batch of step 0
    resumed = LengthWarmupCollator(lambda step: length_at(step, 100, 64, opts), micro_per_step=2, start_step=60)
    assert resumed(rows)["input_ids"].shape == (4, 64)  # a resumed run starts at its step's length
    assert length_at(0, 10, 13, PacingOptions(length_warmup=2)) == 13  # a prime block cannot be split


def test_pacing_options_refuse_c0_outside_zero_one():
    for c0 in (0, -0.1, 1.5):
        cfg = {"model": {"preset": "tiny"}, "data": {"train": "x"}, "stages": [{"curriculum": {"c0": c0}}]}
        with pytest.raises(SelftrainError, match=r"stages\[0\]\.curriculum.*c0"):
            stage_specs(config_from_dict(cfg))
        cfg["stages"] = [{"pretrain": {"order": {"policy": "paced", "column": "difficulty", "c0": c0}}}]
        with pytest.raises(SelftrainError, match="c0"):
            stage_specs(config_from_dict(cfg))
    assert competence(0, 10, PacingOptions(pacing="linear", c0=1.0)) == 1.0  # c0 = 1: everything open, allowed
    cfg["stages"] = [{"pretrain": {"order": {"policy": "weighted", "column": "weight", "pacing": "linear"}}}]
    with pytest.raises(SelftrainError, match="pacing option: it needs order.policy=paced"):
        stage_specs(config_from_dict(cfg))
    from selftrain.stages.pretrain import PretrainConfig
    assert PretrainConfig(**PretrainConfig().model_dump(mode="json")).order.policy == "random"  # a dump loads back


def test_bad_difficulty_is_refused():
    with pytest.raises(SelftrainError, match="finite number"):
        PacedSampler([1.0, float("nan")], PacingOptions(), total_steps=2, per_step=1, seed=0)
    with pytest.raises(SelftrainError, match="no row has a difficulty"):
        PacedSampler([None, None], PacingOptions(), total_steps=2, per_step=1, seed=0)
    _, s = sampler(n=10)
    with pytest.raises(SelftrainError, match="ranks 10 rows, but there are 12"):
        check_order(s, 12)


# ---------------------------------------------------------------------------- scorers
@pytest.fixture(scope="module")
def micro():
    texts = make_corpus(80).split("\n\n")
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), texts, 0)
    return model.eval(), tok, texts


def test_length_and_rarity_rank_what_they_say(micro):
    _, tok, texts = micro
    common, rare = texts[0], "Zyx qwv jjk pqz vvx."
    assert scorers.length([common, common + " " + common], tok) == [pytest.approx(x) for x in
                                                                    (len(tok(common)["input_ids"]),
                                                                     len(tok(common + " " + common)["input_ids"]))]
    r = scorers.rarity([*texts, rare], tok)
    assert r[-1] > max(r[:-1])  # unseen letters are the rarest tokens of the corpus
    assert scorers.rarity([""], tok) == [0.0]


def test_sequence_losses_match_the_models_own_loss(micro):
    model, tok, texts = micro
    rows = [tok(t)["input_ids"] for t in texts[:3]] + [[5]]
    losses = sequence_losses(model, rows, batch_size=2)
    for row, loss in zip(rows[:3], losses):
        ids = torch.tensor([row])
        with torch.no_grad():
            assert loss == pytest.approx(float(model(input_ids=ids, labels=ids).loss), rel=1e-4)
    assert losses[3] == 0.0  # one token predicts nothing


def test_self_loss_finds_the_text_a_trained_model_never_saw_harder(micro, tmp_path):
    model, tok, texts = micro
    opts = LMOptions(max_steps=30, batch_size=8, learning_rate=3e-3, save_steps=1000, logging_steps=10)
    model, _ = paced_lm_train(model, tok, texts, [1.0] * len(texts), opts, PacingOptions(pacing="none"),
                              block_size=32, objective="clm", out_dir=tmp_path / "t", seed=0, device="cpu")
    gibberish = ["Door river apple the a by garden cat lake old the."]
    seen, unseen = scorers.self_loss(model, tok, texts[:20]), scorers.self_loss(model, tok, gibberish)
    assert unseen[0] > max(seen)


def test_cluster_loss_and_rank_combination():
    assert scorers.cluster_loss([1.0, 3.0, 5.0, 7.0], [0, 0, 1, -1]) == [2.0, 2.0, 5.0, 7.0]
    assert scorers.cluster_loss([1.0, 2.0], [None, 4]) == [1.0, 2.0]
    combined = scorers.rank_combination([[1, 2, 3, 4], [40, 30, 20, 10], [1, 2, 3, None]])
    assert combined == pytest.approx([1 / 3, 1 / 2, 2 / 3, 1 / 2])
    assert scorers.rank_combination([[None, 1.0]]) == [None, 0.0]


def test_solve_rate_counts_the_checker_and_skips_texts_without_a_problem(micro, monkeypatch):
    model, tok, _ = micro

    class Solver:  # answers small sums right and the rest wrong: a model whose skill we know
        def __init__(self, *a, **k):
            pass

        def generate(self, prompts, sampling):
            out = []
            for p in prompts:
                a, b = (int(x) for x in p.split("What is ")[1].split("?")[0].split(" + "))
                out.append(str(a + b) if a + b < 50 else "0")
            return out

    monkeypatch.setattr(scorers, "TransformersBackend", Solver)
    family = make_family("arithmetic")
    texts = ["What is 12 + 13?", "What is 70 + 25?", "The cat sees the river."]
    rates = scorers.solve_rate(model, tok, texts, family, samples=3)
    assert rates == [0.0, 1.0, None]


# ---------------------------------------------------------------------------- training
def test_equal_difficulty_trains_in_random_order_and_says_so(micro, tmp_path):
    model, tok, texts = micro
    opts = LMOptions(max_steps=4, batch_size=4, save_steps=1000, logging_steps=2)
    _, m = paced_lm_train(model, tok, texts, [2.0] * len(texts), opts, PacingOptions(pacing="sqrt"),
                          block_size=32, objective="clm", out_dir=tmp_path / "t", seed=0, device="cpu")
    assert m["fallback"].startswith("every block is equally difficult") and m["pacing"]["pacing"] == "none"


class Spy(TrainerCallback):
    """Records, per optimizer step, the rows the model is trained on (a forward hook in train mode)."""

    def __init__(self, model):
        self.step, self.seen = 0, {}
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if module.training:
            self.seen.setdefault(self.step, []).extend(tuple(r) for r in kwargs["input_ids"].tolist())

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step


def sorted_by(texts, difficulty):
    order = rank_rows(difficulty, "easy_first", 0)
    return [texts[i] for i in order], [difficulty[i] for i in order]


def test_the_trainer_is_fed_only_the_open_blocks(micro, tmp_path):
    """Through the real Trainer: every block trained at step t is among the c(t) easiest."""
    _, tok, texts = micro
    model = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), texts, 0)[0]
    difficulty = [float(len(t)) for t in texts]
    opts = LMOptions(max_steps=8, batch_size=4, grad_accum=2, save_steps=1000, logging_steps=4)
    pacing = PacingOptions(pacing="linear", c0=0.1, ramp=1.0)
    spy = Spy(model)
    paced_lm_train(model, tok, texts, difficulty, opts, pacing, block_size=32, objective="clm",
                   out_dir=tmp_path / "t", seed=0, device="cpu", callbacks=[spy])
    sorted_texts, sorted_difficulty = sorted_by(texts, difficulty)
    blocks = [tuple(b) for b in pack_texts(sorted_texts, tok, 32)["input_ids"]]
    reference = PacedSampler(pack_texts(sorted_texts, tok, 32, values=sorted_difficulty)["value"], pacing,
                             total_steps=8, per_step=8, seed=0)
    ranking, _ = reference.ranking_at(0)
    assert sorted(spy.seen) == list(range(8)) and all(len(rows) == 8 for rows in spy.seen.values())
    for step, rows in spy.seen.items():
        open_blocks = {blocks[i] for i in ranking[:reference.open_rows(step)]}
        assert set(rows) <= open_blocks, step
    assert not set(spy.seen[7]) <= {blocks[i] for i in ranking[:reference.open_rows(0)]}  # harder blocks do come


def test_a_killed_self_paced_run_resumes_with_its_rescored_ranking(micro, tmp_path, monkeypatch):
    """Killed after a re-score and a checkpoint at the same step, the run resumes from the
    checkpoint with the re-scored ranking (not the first one), draws what the uninterrupted run
    drew, and its trace has every step once."""
    _, tok, texts = micro
    difficulty = [float(len(t)) for t in texts]
    opts = LMOptions(max_steps=12, batch_size=4, learning_rate=3e-3, save_steps=5, logging_steps=5)
    pacing = PacingOptions(pacing="linear", c0=0.2, ramp=1.0, rescore_every=5)
    draws: dict[str, dict[int, list[int]]] = {}
    draw = PacedSampler.draw

    def recording(name):
        def wrapped(self, step):
            rows = draw(self, step)
            draws.setdefault(name, {})[step] = rows
            return rows
        return wrapped

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 8:
                raise KeyboardInterrupt

    def train(name, out, **kw):
        model = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), texts, 0)[0]
        monkeypatch.setattr(PacedSampler, "draw", recording(name))
        return paced_lm_train(model, tok, texts, difficulty, opts, pacing, block_size=32, objective="clm",
                              out_dir=tmp_path / out, seed=0, device="cpu", probe_every=2, **kw)[1]

    whole = train("whole", "whole")
    with pytest.raises(KeyboardInterrupt):
        train("killed", "cut", callbacks=[Kill()])
    resumed = train("resumed", "cut")
    assert resumed["resumed_from_step"] == 5
    monkeypatch.setattr(PacedSampler, "draw", draw)
    sorted_texts, sorted_difficulty = sorted_by(texts, difficulty)
    first_ranking = PacedSampler(pack_texts(sorted_texts, tok, 32, values=sorted_difficulty)["value"], pacing,
                                 total_steps=12, per_step=4, seed=0)
    assert draws["whole"][7] != first_ranking.draw(7)  # re-ranked from step 7
    assert [draws["resumed"][t] for t in range(5, 12)] == [draws["whole"][t] for t in range(5, 12)]
    assert resumed["rescored_at"] == whole["rescored_at"] == [5]  # at 10 it would be in force from 12: none left
    steps = [p["step"] for p in resumed["bucket_loss"]]
    assert steps == sorted(set(steps)) == [p["step"] for p in whole["bucket_loss"]]  # each once, in order


# ---------------------------------------------------------------------------- the stage in a run
def curriculum(**kw) -> dict:
    opts = {"max_steps": 20, "block_size": 32, "batch_size": 8, "learning_rate": 3e-3, "logging_steps": 5,
            "save_steps": 10, "c0": 0.2}
    return {"curriculum": {**opts, **kw}}


def test_the_stage_scores_trains_easy_to_hard_and_paces_the_stages_after_it(tmp_path, corpus_file):
    cfg = micro_config(tmp_path / "run", corpus_file,
                       [pretrain(max_steps=20), curriculum(difficulty=["self_loss", "length"], rescore_every=8),
                        pretrain(max_steps=6), pretrain(max_steps=4, order={"policy": "random"})],
                       guard={"tolerance": 10.0})
    manifest = Runner(config_from_dict(cfg)).run()
    first, cur, inherited, own = manifest["stages"]
    assert [s["status"] for s in manifest["stages"]] == ["accepted"] * 4, [s.get("reason") for s in manifest["stages"]]
    m = cur["stage_metrics"]
    assert m["scorers"] == ["self_loss", "length"] and m["scored"] == m["texts"] > 100
    assert m["length_rank_correlation"] > 0.3  # half of the combined rank is length
    assert m["rescored_at"] == [8, 16] and m["pacing"]["pacing"] == "sqrt"
    assert [p["step"] for p in m["bucket_loss"]][0] == 0 and m["bucket_loss"][-1]["step"] == 20
    early, late = m["bucket_loss"][0]["losses"], m["bucket_loss"][-1]["losses"]
    assert all(b < a for a, b in zip(early, late))  # every bucket's loss fell
    run = tmp_path / "run"
    for name in ("curriculum", "curriculum_competence", "curriculum_bucket_loss"):
        assert (run / cur["artefacts"][name]).is_file()
    pool = Pool.load(run / manifest["pool"])
    marks = json.loads((run / cur["annotations"]["path"]).read_text())
    assert set(marks["difficulty"]) == set(pool.ds["id"])  # every row scored
    assert all(0.0 <= d <= 1.0 for d in marks["difficulty"].values())  # rank-combined: percentiles
    assert inherited["stage_metrics"]["order"] == "paced" and own["stage_metrics"]["order"] == "random"
    assert inherited["stage_metrics"]["rescored_at"] == []  # inherited rescore_every=8, 6 steps: none due
    assert (run / inherited["artefacts"]["curriculum_competence"]).is_file()
    report = (run / "report.md").read_text()
    assert "![competence]" in report and "![loss per bucket]" in report and "Hardest:" in report


def test_pretrain_paces_by_a_pool_column(tmp_path, corpus_file):
    order = {"policy": "paced", "column": "difficulty", "pacing": "baby_steps", "buckets": 3}
    cfg = micro_config(tmp_path / "run", corpus_file,
                       [curriculum(difficulty="rarity", train=False), pretrain(max_steps=6, order=order)],
                       guard={"tolerance": 10.0})
    manifest = Runner(config_from_dict(cfg)).run()
    cur, pre = manifest["stages"]
    assert pre["start_checkpoint"] == cur["start_checkpoint"]  # scoring only: the model is unchanged
    assert pre["stage_metrics"]["order"] == "paced" and pre["stage_metrics"]["pacing"]["pacing"] == "baby_steps"


def test_model_scorers_where_no_model_applies_are_refused_before_anything_runs(tmp_path, corpus_file):
    masked = micro_config(tmp_path / "m", corpus_file, [curriculum(difficulty="self_loss", train=False)],
                          model={"preset": "tiny-bert", "architecture": BERT_ARCH})
    with pytest.raises(SelftrainError, match="self_loss asks a causal LM"):
        Runner(config_from_dict(masked)).run()
    assert not (tmp_path / "m" / "manifest.json").exists()
    no_family = micro_config(tmp_path / "f", corpus_file, [curriculum(difficulty="solve_rate")])
    with pytest.raises(SelftrainError, match="solve_rate needs `family`"):
        stage_specs(config_from_dict(no_family))
    no_problems = micro_config(tmp_path / "p", corpus_file,
                               [curriculum(difficulty="solve_rate", family="arithmetic", train=False)])
    with pytest.raises(SelftrainError, match="no text states a problem the arithmetic family can parse"):
        Runner(config_from_dict(no_problems)).run()
    no_clusters = micro_config(tmp_path / "c", corpus_file, [curriculum(difficulty="cluster_loss", train=False)])
    with pytest.raises(SelftrainError, match="run the cluster stage before"):
        Runner(config_from_dict(no_clusters)).run()


def test_sft_pairs_are_paced_by_the_models_own_completion_loss(micro, tmp_path):
    model, tok, texts = micro
    prompts = [t.split(".")[0] for t in texts[:24]]
    completions = [" " + t.split(".")[1] if i % 2 else " zq xv jj" for i, t in enumerate(texts[:24])]
    opts = SFTOptions(max_steps=3, batch_size=4, learning_rate=1e-3, pacing={"pacing": "linear", "c0": 0.25})
    assert completion_curriculum(model, tok, ["Q"] * 4, [" a"] * 4, opts, seed=0)[0] is None  # all equal: shuffled
    sampler, found = completion_curriculum(model, tok, prompts, completions, opts, seed=0)
    first = sampler.draw(0)
    easiest = sorted(range(24), key=lambda i: sampler.difficulty[i])[:sampler.open_rows(0)]
    assert found["sft_pacing"] == "linear" and set(first) <= set(easiest) and sampler.open_rows(0) == 6
    _, metrics = sft_train(model, tok, prompts, completions, opts, out_dir=tmp_path / "sft", seed=0, device="cpu")
    assert metrics["sft_pacing"] == "linear" and metrics["sft_last_loss"] is not None

    published = tmp_path / "curriculum.json"
    published.write_text(json.dumps({"column": "difficulty", "pacing": PacingOptions(
        pacing="exponential", rescore_every=5).model_dump()}))
    inherited = paced_by_curriculum(SFTOptions(), {"curriculum": published})
    assert inherited.pacing.pacing == "exponential" and inherited.pacing.rescore_every == 5
    assert paced_by_curriculum(SFTOptions(pacing=None), {"curriculum": published}).pacing is None  # opted out
    with pytest.raises(ValueError, match="length_warmup applies to packed LM blocks"):
        SFTOptions(pacing={"length_warmup": 3})
    self_paced = SFTOptions(max_steps=7, batch_size=4, learning_rate=1e-3, pacing={"pacing": "sqrt", "rescore_every": 2})
    _, metrics = sft_train(model, tok, prompts, completions, self_paced, out_dir=tmp_path / "sp", seed=0, device="cpu")
    assert metrics["sft_rescored"]["rescored_at"] == [2, 4]


def test_a_checkpoint_cut_before_its_curriculum_state_is_not_resumed(tmp_path):
    """The Trainer marks a checkpoint complete before the curriculum adds its state: a kill in
    between leaves a checkpoint that would resume with the first ranking; it is dropped instead."""
    for step, with_state in ((5, True), (10, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        if with_state:
            trace = {"bucket_loss": [{"step": 4}, {"step": 6}], "rescored_at": [5]}
            (folder / curriculum_mod.STATE_FILE).write_text(json.dumps({"history": [[0, [1.0]], [7, [2.0]]], "trace": trace}))
    step, history, trace = curriculum_mod.resumed_state(tmp_path)
    assert step == 5 and history == [[0, [1.0]], [7, [2.0]]] and not (tmp_path / "checkpoint-10").exists()
    assert [p["step"] for p in trace["bucket_loss"]] == [4]  # what came after the checkpoint is redone
