"""The `adversarial` stage: the discriminator separates real text from samples and is calibrated,
the generator's score rises under the game, a discriminator that keeps winning is weakened, mode
collapse is caught (and handed to the guard), approved samples carry provenance under the cap, a
killed game resumes with both models, and the discriminator filters other stages' output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO_ARCH, make_corpus, micro_config, pretrain
from datasets import Dataset
from safetensors.torch import load_file

import selftrain.stages.adversarial as adversarial
from selftrain.config import GuardConfig, ModelConfig, config_from_dict
from selftrain.data.pool import Pool, make_examples, to_dataset
from selftrain.errors import SelftrainError
from selftrain.evaluation.diversity import self_bleu
from selftrain.evaluation.variant_filters import Judged, discriminator_filter
from selftrain.guard import judge
from selftrain.modeling.discriminator import Discriminator
from selftrain.modeling.factory import build_initial, load_checkpoint, save_checkpoint
from selftrain.modeling.generation import SamplingParams, TransformersBackend
from selftrain.runner import Runner
from selftrain.stages.adversarial import (
    AdversarialConfig,
    AdversarialStage,
    DiscriminatorTurn,
    collapse_reason,
)
from selftrain.stages.base import RunState
from selftrain.training.discriminator import DiscriminatorUpdater, Weakening, accuracy, calibrate

TEXTS = make_corpus(120).split("\n\n")
DISC = {"pretrain_steps": 30, "pretrain_samples": 32, "calibration_texts": 16}
SMALL = {"rounds": 2, "steps_per_round": 3, "learning_rate": 1e-3, "groups_per_step": 2, "num_generations": 4,
         "completion_tokens": 12, "precision": "fp32", "eval_samples": 16, "eval_tokens": 512, "synthesize": 24,
         "discriminator": DISC}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """An untrained micro Llama, saved (the stage and TRL's KL reference load it from disk)."""
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), TEXTS, 0)
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("micro") / "model"), model, tok


def samples_of(model, tok, n: int, seed: int) -> list[str]:
    return TransformersBackend(model, tok, batch_size=32).generate([""] * n, SamplingParams(max_new_tokens=16, seed=seed))


def direct_state(tmp_path: Path, checkpoint: Path) -> RunState:
    """A run state built by hand (the stage without the runner): the corpus as real rows."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(120))
    cfg = config_from_dict(micro_config(tmp_path / "run", corpus, ["adversarial"]))
    pool = Pool(to_dataset(make_examples(TEXTS[:-12], origin="real", op="source", stage="data", round=0)))
    stage_dir = tmp_path / "stage"
    stage_dir.mkdir()
    return RunState(config=cfg, checkpoint=checkpoint, kind="causal", pool=pool, heldout=TEXTS[-12:], seed=0,
                    stage_key="r1-01-adversarial", stage_dir=stage_dir)


# ---------------------------------------------------------------------- the discriminator
def test_discriminator_separates_real_text_from_an_untrained_models_samples(micro):
    _, model, tok = micro
    fake_train, fake_test = samples_of(model, tok, 64, seed=1), samples_of(model, tok, 32, seed=2)
    real_train, real_test = TEXTS[:80], TEXTS[80:112]
    disc = Discriminator.build("scratch", generator_dir=micro[0], tokenizer=tok, max_length=64, seed=0)
    before = accuracy(disc, real_test, fake_test)["accuracy"]
    DiscriminatorUpdater(disc, learning_rate=1e-3, batch_size=16, seed=0).update(
        real_train, fake_train, steps=60, weakening=Weakening())
    after = accuracy(disc, real_test, fake_test)
    assert after["accuracy"] >= 0.95 > before + 0.2, (before, after)  # on texts it never trained on
    assert after["p_real_of_real"] > 0.8 > 0.2 > after["p_real_of_generated"]


def test_calibration_fits_a_temperature_that_lowers_the_calibration_error(micro):
    """An over-confident discriminator (trained hard on a few texts) mislabels with certainty; the
    fitted temperature softens it: the expected calibration error falls."""
    _, model, tok = micro
    disc = Discriminator.build("scratch", generator_dir=micro[0], tokenizer=tok, max_length=64, seed=0)
    real_texts = [" ".join(t.split()[:8]) for t in TEXTS]
    fakes = [" ".join(random.Random(i).sample(t.split()[:8], len(t.split()[:8]))) for i, t in enumerate(TEXTS)]
    DiscriminatorUpdater(disc, learning_rate=3e-3, batch_size=8, seed=0).update(
        real_texts[:8], fakes[:8], steps=80, weakening=Weakening())  # memorises 8 of each
    cal = calibrate(disc, real_texts[60:100], fakes[60:100])
    assert cal["temperature"] > 1.0 and cal["ece_after"] < cal["ece_before"], cal
    assert disc.temperature == pytest.approx(cal["temperature"], abs=1e-4)


def test_a_discriminator_that_keeps_winning_is_weakened_and_the_event_logged(micro, tmp_path):
    _, model, tok = micro
    state = direct_state(tmp_path, micro[0])
    logged = []
    state.log = logged.append
    disc = Discriminator.build("scratch", generator_dir=micro[0], tokenizer=tok, max_length=64, seed=0)
    fakes = ["zq xv " * 6] * 16  # nothing like the corpus: it wins every time
    updater = DiscriminatorUpdater(disc, learning_rate=1e-3, batch_size=16, seed=0)
    updater.update(TEXTS, fakes, steps=30, weakening=Weakening())
    weakening = Weakening(updates=4)

    class Env:
        fresh = fakes

        def note(self, *_):
            pass

    opts = AdversarialConfig().discriminator.model_copy(update={"weaken_above": 0.95, "weaken_patience": 2})
    turn = DiscriminatorTurn(Env(), disc, updater, weakening, TEXTS[:-20], TEXTS[-20:], opts, state, round_=1,
                             step_offset=10)

    class Step:
        global_step = 0

    for step in range(1, 4):
        Step.global_step = step
        turn.on_step_end(None, Step, None)
    assert [e["event"] for e in turn.events] == ["discriminator_weakened"]  # after 2 winning steps, once
    event = turn.events[0]
    assert event["step"] == 12 and event["accuracy"] >= 0.95
    assert (weakening.label_smoothing, weakening.noise, weakening.updates, weakening.times) == (0.1, 0.05, 2, 1)
    assert [r["event"] for r in logged if "event" in r] == ["discriminator_weakened"]


def test_weakening_never_strengthens_and_a_frozen_discriminator_stays_frozen():
    strong = Weakening(label_smoothing=0.44, noise=0.6, updates=1)
    strong.weaken()
    assert (strong.label_smoothing, strong.noise, strong.updates) == (0.45, 0.6, 1)
    frozen = Weakening(updates=0)
    frozen.weaken()
    assert frozen.updates == 0 and frozen.label_smoothing == 0.1


def test_an_empty_sample_is_never_real(micro):
    """A sample that stops at once decodes to nothing; to a classifier without a bias an all-padding
    row reads 0.5 whatever it learned, so P(real) of an empty text is 0 by rule."""
    from selftrain.rewards.discriminator import DiscriminatorReward

    disc = Discriminator.build("lm", generator_dir=micro[0], tokenizer=micro[2], max_length=32, seed=0)
    scores = DiscriminatorReward(disc)(["", "", ""], ["", "  ", "the cat"], window=["", "  ", "the cat"])
    assert scores[:2] == [0.0, 0.0] and 0 < scores[2] < 1
    # with a real prefix as the prompt, an empty completion is still no sample (not the bare prefix)
    tok = micro[2]
    env = adversarial.AdversarialEnv(tok, Dataset.from_list([{"id": "a", "text": TEXTS[0]}]),
                                     AdversarialConfig(prompt="prefix", prefix_tokens=4), seed=0)
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert env._windows([ids[:4], ids[:4]], [[tok.eos_token_id], ids[4:8]]) == ["", tok.decode(ids[:8])]


# ---------------------------------------------------------------------- the game
def test_under_the_game_the_generators_discriminator_score_rises(micro, tmp_path):
    """With the discriminator frozen after pre-training (updates 0), the same judge scores the
    generator before and after: the trained generator's samples look more real to it."""
    state = direct_state(tmp_path, micro[0])
    config = AdversarialConfig(**{**SMALL, "rounds": 2, "steps_per_round": 16, "learning_rate": 1e-2, "beta": 0.0,
                                  "synthesize": 0, "discriminator": {**DISC, "updates": 0, "weaken_above": 1.0}})
    torch.manual_seed(0)
    result = AdversarialStage().run(state, config)
    disc = Discriminator.load(result.auxiliary["discriminator"])
    env = adversarial.AdversarialEnv(micro[2], adversarial.real_rows(state.pool), config, seed=0)
    trained, _ = load_checkpoint(result.checkpoint, "causal")
    # 1,024 samples each: the effect is a few hundredths of probability, 128 samples are too noisy
    before = np.mean([disc.p_real(env.sample(micro[1], 512, seed=s)[0]).mean() for s in (1, 2)])
    after = np.mean([disc.p_real(env.sample(trained, 512, seed=s)[0]).mean() for s in (1, 2)])
    assert after > 1.25 * before, (before, after)  # measured: 0.094 -> 0.264
    assert result.metrics["rewards/discriminator/mean/last"] > result.metrics["rewards/discriminator/mean/first"]
    assert len(result.metrics["rounds"]) == 3 and result.metrics["returned_round"] == 2


def test_collapse_signals_and_the_guard():
    config = AdversarialConfig()
    varied = [f"the {a} sees a {b} near the {c}" for a, b, c in zip("abcdefgh", "ijklmnop", "qrstuvwx")]
    assert self_bleu(["the cat sat on the mat"] * 6) == pytest.approx(1.0)
    assert self_bleu(varied) < 0.5
    base = {"self_bleu": 0.2, "distinct_2": 0.8}
    assert collapse_reason(base, {"self_bleu": 0.3, "distinct_2": 0.7}, config) is None
    assert "self-BLEU" in collapse_reason(base, {"self_bleu": 0.5, "distinct_2": 0.7}, config)
    assert "distinct-2" in collapse_reason(base, {"self_bleu": 0.2, "distinct_2": 0.5}, config)
    decision = judge(GuardConfig(), {"heldout_ppl": 10.0}, {"heldout_ppl": 9.0}, {"collapse": "self-BLEU 0.2 -> 0.9"})
    assert not decision.accepted and "stage collapse detector" in decision.reason and "self-BLEU" in decision.reason


def _collapse_in(monkeypatch, round_: int):
    """Make the generator collapse for real in ``round_``: after that round's training its final
    norm is scaled 50x, so sampling is near-greedy and every sample repeats the same text."""
    real = adversarial.grpo_train
    calls = []

    def collapsing(model, *args, **kwargs):
        calls.append(1)
        model, records, guarded = real(model, *args, **kwargs)
        if len(calls) == round_:
            with torch.no_grad():
                model.model.norm.weight.mul_(50.0)
        return model, records, guarded

    monkeypatch.setattr(adversarial, "grpo_train", collapsing)


def _run(tmp_path, stages, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    cfg = micro_config(tmp_path / "run", corpus, stages, **{"guard": {"tolerance": 10.0}, **sections})
    return Runner(config_from_dict(cfg)).run()


def test_collapse_in_a_later_round_returns_the_last_healthy_generator(tmp_path, monkeypatch):
    _collapse_in(monkeypatch, round_=2)
    manifest = _run(tmp_path, [pretrain(max_steps=20), {"adversarial": {**SMALL, "synthesize": 0}}])
    entry = manifest["stages"][1]
    m = entry["stage_metrics"]
    assert m["returned_round"] == 1 and [e["event"] for e in m["events"]][-1] == "collapse"
    assert collapse_reason(m["rounds"][0], m["rounds"][2], AdversarialConfig()) == m["events"][-1]["reason"]
    assert collapse_reason(m["rounds"][0], m["rounds"][1], AdversarialConfig()) is None
    assert "collapse" not in m and entry["decision"] == "accepted"
    assert entry["checkpoint"].endswith("game/round-1/generator")


def test_collapse_in_the_first_round_is_handed_to_the_guard(tmp_path, monkeypatch):
    _collapse_in(monkeypatch, round_=1)
    manifest = _run(tmp_path, [pretrain(max_steps=20), {"adversarial": {**SMALL, "synthesize": 0}}])
    entry = manifest["stages"][1]
    assert entry["decision"] == "rolled_back" and entry["reason"].startswith("stage collapse detector: found by the stage")
    assert len(entry["stage_metrics"]["rounds"]) == 2  # the game stopped at round 1 of 2
    assert entry.get("auxiliary_deleted") and entry.get("checkpoint_deleted")


# ---------------------------------------------------------------------- through the runner
def test_approved_samples_carry_provenance_and_respect_the_synthetic_cap(tmp_path, pool_lists_refused):
    adv = {**SMALL, "rounds": 1, "prompt": "prefix", "prefix_tokens": 4, "synthesize": 48, "keep_fraction": 0.5}
    manifest = _run(tmp_path, [pretrain(), {"adversarial": adv}], guard={"tolerance": 10.0, "max_synthetic_fraction": 0.02})
    entry = manifest["stages"][1]
    assert entry["decision"] == "accepted"
    run = tmp_path / "run"
    pool = Pool.load(run / manifest["pool"])
    rows = pool.rows("adversarial")
    n_real = len(pool.rows("real"))
    synth = entry["stage_metrics"]["synthesis"]
    assert synth["kept"] == entry["pool_added"] + entry["pool_dropped_by_cap"] and entry["pool_dropped_by_cap"] > 0
    assert len(rows) == entry["pool_added"] == int(0.02 * n_real / 0.98)  # the cap, exactly
    real_ids = {r["id"] for r in pool.rows("real")}
    for r in rows:
        assert r["op"] == "approved" and r["stage"] == entry["key"] and r["round"] == 1
        assert r["parent_id"] in real_ids  # the real text whose prefix the sample continues
        parent = next(p["text"] for p in pool.rows("real") if p["id"] == r["parent_id"])
        assert " ".join(r["text"].split()) not in " ".join(parent.split())  # not the real text itself
        assert 0 <= r["meta"]["disc_score"] <= 1
    approved = [json.loads(line) for line in (run / entry["artefacts"]["adversarial_samples"]).read_text().splitlines()]
    scores = [a["score"] for a in approved]
    assert scores == sorted(scores, reverse=True)  # kept from the most real-looking down
    assert (run / entry["artefacts"]["adversarial_plot"]).stat().st_size > 10_000
    disc = Discriminator.load(run / entry["auxiliary"]["discriminator"])  # the published auxiliary model
    assert disc.p_real(["the cat sees the river"]).shape == (1,)
    report = (run / "report.md").read_text()
    assert "Adversarial game" in report and "Approved" in report


def test_a_killed_game_resumes_after_its_last_round_with_both_models(tmp_path, monkeypatch):
    real = adversarial.grpo_train
    calls = []

    def killed_in_round_2(model, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stops mid-round 2; round 1 is saved
        return real(model, *args, **kwargs)

    monkeypatch.setattr(adversarial, "grpo_train", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, [pretrain(max_steps=20), {"adversarial": {**SMALL, "synthesize": 0}}])
    game = tmp_path / "run" / "stages" / "r1-02-adversarial" / "game"
    saved = json.loads((game / "state.json").read_text())
    assert saved["round"] == 1
    generator = load_file(game / "round-1" / "generator" / "model.safetensors")
    disc_weights = load_file(game / "round-1" / "discriminator" / "model.safetensors")

    seen = {}

    def resumed(model, tokenizer, env, rewards, **kwargs):
        seen["generator"] = {k: v.clone() for k, v in model.state_dict().items()}
        seen["discriminator"] = {k: v.clone() for k, v in rewards["discriminator"][0].discriminator.model.state_dict().items()}
        return real(model, tokenizer, env, rewards, **kwargs)

    monkeypatch.setattr(adversarial, "grpo_train", resumed)
    manifest = Runner(config_from_dict(micro_config(tmp_path / "run", tmp_path / "corpus.txt",
                                                    [pretrain(max_steps=20), {"adversarial": {**SMALL, "synthesize": 0}}],
                                                    guard={"tolerance": 10.0}))).run()
    entry = manifest["stages"][1]
    m = entry["stage_metrics"]
    assert m["resumed_from_round"] == 1 and [r["round"] for r in m["rounds"]] == [0, 1, 2]
    assert manifest["stages"][0]["attempts"] == 1  # pretrain was not redone
    for name, tensor in generator.items():  # round 2 started from round 1's saved weights, both models
        assert torch.equal(seen["generator"][name], tensor), name
    for name, tensor in disc_weights.items():
        assert torch.equal(seen["discriminator"][name], tensor), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / entry["artefacts"]["adversarial_steps"]).read_text().splitlines()]
    assert steps == list(range(1, 7))  # round 1's 3 steps kept, round 2's 3 after them


# ---------------------------------------------------------------------- config and filters
def test_bad_adversarial_configs_are_clear_errors(tmp_path, micro):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    for options, words in (({"discriminator": {"kind": str(tmp_path / "nowhere")}}, "adversarial.discriminator.kind"),
                           ({"prompt": "prefix", "prefix_tokens": 4000}, "prefix_tokens"),
                           ({"discriminator": {"weaken_above": 0.3}}, "weaken_above")):
        cfg = micro_config(tmp_path / "run", corpus, [{"adversarial": options}])
        with pytest.raises(SelftrainError, match=words):
            Runner(config_from_dict(cfg)).run()
        assert not (tmp_path / "run" / "manifest.json").exists()  # refused before anything was written


def test_a_pool_without_real_text_is_a_clear_error(tmp_path, micro):
    """Every row synthetic (or blank): the stage says how many real texts it has, not a tokenizer's IndexError."""
    state = direct_state(tmp_path, micro[0])
    state.pool = Pool(to_dataset(make_examples(TEXTS[:20], origin="augment", op="swap", stage="s", round=1)
                                 + make_examples(["   "], origin="real", op="source", stage="data", round=0)))
    assert len(adversarial.real_rows(state.pool)) == 0
    with pytest.raises(SelftrainError, match="0 real texts"):
        AdversarialStage().run(state, AdversarialConfig(**SMALL))


class ScoreByLength:
    """A stand-in discriminator: P(real) grows with the number of words."""

    def p_real(self, texts):
        return np.array([min(1.0, len(t.split()) / 10) for t in texts])


def test_the_discriminator_filter_rejects_what_it_finds_unreal():
    judged = Judged.fresh(4)
    judged.reject(3, "too_short")
    discriminator_filter(judged, ["a b", "a b c d e f g h", "a b c d e f", "x"], ScoreByLength(), min_score=0.5)
    assert judged.keep == [False, True, True, False]
    assert judged.rejected == {"too_short": 1, "discriminator": 1}
    assert judged.real_score == [0.2, 0.8, 0.6, None]  # the one already rejected is not scored


def test_augment_filters_with_the_discriminator_an_adversarial_stage_published(tmp_path):
    adv = {**SMALL, "rounds": 1, "synthesize": 0}
    augment = {"augment": {"ops": ["swap", "delete"], "synonyms": "embedding",
                           "filters": {"similarity": None, "perplexity_ratio": None, "discriminator": 0.99}}}
    manifest = _run(tmp_path, [pretrain(), {"adversarial": adv}, augment])
    m = manifest["stages"][2]["stage_metrics"]
    assert manifest["stages"][1]["decision"] == "accepted"
    assert m["discriminator_filter"] is True and m["rejected"].get("discriminator", 0) > 0
    # without an accepted adversarial stage the filter is skipped, and says so
    manifest = _run(tmp_path / "alone", [augment])
    assert manifest["stages"][0]["stage_metrics"]["discriminator_filter"] is False
