"""The `selfplay` stage: task families, rewards on hand-made inputs, the proposer/solver game's
bookkeeping with a scripted backend, GRPO that learns, DPO envs and failure handling."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import MICRO_ARCH, make_corpus, micro_config

from selftrain.config import ModelConfig
from selftrain.errors import SelftrainError
from selftrain.modeling.factory import build_initial
from selftrain.rewards.dialogue import Coherence, Relevance, non_repetition
from selftrain.rewards.judge import SelfJudge
from selftrain.stages.selfplay import SelfplayConfig
from selftrain.stages.selfplay.env import EnvMetrics
from selftrain.stages.selfplay.grpo import grpo_options
from selftrain.stages.selfplay.proposer_solver import (
    ProposerSolverEnv,
    eval_problem_keys,
    learnability,
)
from selftrain.tasks.families import (
    Arithmetic,
    PythonPrograms,
    StringTransforms,
    make_family,
)
from selftrain.training.grpo import GuardedReward, grpo_train

TEXTS = make_corpus(60).split("\n\n")


@pytest.fixture(scope="module")
def micro():
    model, tok, _ = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), TEXTS, 0)
    return model, tok


# ---------------------------------------------------------------------- families
def test_arithmetic_family_computes_answers_and_rejects_out_of_family():
    fam = Arithmetic(digits=2, ops=("+",))
    p = fam.parse("Sure! What is 23 + 45?")
    assert (p.question, p.answer) == ("23 + 45", "68")
    assert fam.parse("What is 5 + 45?") is None  # one operand has one digit
    assert fam.parse("What is 23 - 45?") is None  # operator outside the family
    assert fam.parse("no numbers here") is None
    assert fam.check("23 + 45 = 68", p) and fam.check("The answer is 68.", p)
    assert not fam.check("68 is wrong, it is 69", p) and not fam.check("I don't know", p)
    assert fam.check("23 + 45 = 68\n\nThis is 2 numbers", p)  # judged on the first line
    r = fam.random_problem(random.Random(0))
    assert int(r.answer) == sum(int(x) for x in r.question.split(" + "))


def test_string_family_applies_the_named_transform():
    fam = StringTransforms()
    p = fam.parse('Here: reverse "garden"')
    assert p.answer == "nedrag" and fam.check('"nedrag"', p) and not fam.check("garden", p)
    assert fam.parse('count the vowels in "banana"').answer == "3"
    assert fam.parse('explode "banana"') is None


def test_python_family_answer_comes_from_the_sandbox():
    fam = PythonPrograms()
    p = fam.parse("```python\ndef f(x):\n    return x * 3 + 1\nprint(f(4))\n```")
    assert p.answer == "13" and fam.check("13", p)
    assert fam.parse("```python\nwhile True:\n    pass\nprint(1)\n```") is None  # timed out: no problem
    assert fam.parse("```python\nimport os\nprint(os.fork())\n```") is None  # refused by the sandbox
    with pytest.raises(SelftrainError):
        make_family("chess")


def test_learnability_peaks_inside_the_frontier():
    assert learnability(0.0) == learnability(1.0) == 0.0 and learnability(None) == 0.0
    assert learnability(0.25) == 0.75 and learnability(0.75) == 0.25
    assert learnability(0.5, "variance") == 1.0 > learnability(0.9, "variance")


# ---------------------------------------------------------------------- rewards
def test_game_rewards_on_hand_made_inputs(micro):
    _, tok = micro
    fam = Arithmetic()
    env = ProposerSolverEnv(fam, tok, chat=False)
    p = fam.parse("12 + 30")
    fns = env.rewards()
    roles = ["solve", "solve", "propose", "propose"]
    problems = [p, p, p, None]
    assert fns["solver_correct"]([""] * 4, ["42", "41", "x", "y"], role=roles, problem=problems) == [1.0, 0.0, None, None]
    assert fns["proposer_learnability"]([""] * 4, ["a"] * 4, role=roles, solve_rate=[0.5, 0.5, 0.25, None]) == \
        [None, None, 0.75, 0.0]
    assert fns["proposal_valid"]([""] * 4, ["a"] * 4, role=roles, problem=problems) == [None, None, 1.0, 0.0]


def test_non_repetition_penalises_loops_and_echoes():
    ctx = ["Do you like the river by the lake?"] * 3
    got = non_repetition(None, ["I walk to the market every day.", "the river by the lake", "yes yes yes yes yes"],
                         context=ctx)
    assert got[0] == 1.0 and got[1] < 0.5 and got[2] < 0.5
    assert non_repetition(None, [""], context=["hi"]) == [0.0]
    with pytest.raises(ValueError):
        non_repetition(None, ["a b c"], context=[])


def test_relevance_is_embedding_similarity_to_previous_turn():
    vectors = {"cats are nice": [1.0, 0.0], "i like cats": [0.8, 0.6], "stock prices": [0.0, 1.0]}

    def embed(texts):
        return torch.nn.functional.normalize(torch.tensor([vectors[t] for t in texts]), dim=-1)

    rel = Relevance(embed)
    got = rel(None, ["i like cats", "stock prices"], previous_turn=["cats are nice", "cats are nice"])
    assert got == pytest.approx([0.8, 0.0])


def test_coherence_prefers_what_the_frozen_model_finds_likely(micro):
    model, tok = micro
    coh = Coherence(model, tok)
    prompt = "the cat"
    with torch.no_grad():  # the frozen model's own greedy continuation vs a shuffled one
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    likely = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    words = likely.split()
    unlikely = " ".join(reversed(words)) + " zq xv"
    a, b, empty = coh(None, [likely, unlikely, ""], context=[prompt] * 3)
    assert 0 < b < a <= 1 and empty == 0.0


def test_judge_scores_follow_the_models_digit_preference(micro):
    model, tok = micro
    judge = SelfJudge(model, tok, chat=False)
    five = tok.encode("5", add_special_tokens=False)[-1]
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + 30 * torch.nn.functional.one_hot(
        torch.tensor(five), o.shape[-1]).to(o.dtype))
    try:
        assert judge.judge(["q"], ["a"])[0] == pytest.approx(5.0, abs=1e-3)
    finally:
        handle.remove()
    plain = judge.judge(["q", "q"], ["a", "b"])
    assert all(1.0 <= s <= 5.0 for s in plain)


def test_guarded_reward_skips_and_counts_then_stops():
    def broken(prompts, completions, **_):
        raise RuntimeError("boom")

    def short(prompts, completions, **_):
        return [1.0]

    g = GuardedReward(broken, "broken", max_failures=3)
    assert g(["p"] * 2, ["a", "b"]) == [None, None]
    assert g.failures == 1 and g.skipped == 2 and "boom" in g.last_error
    s = GuardedReward(short, "short", max_failures=3)
    assert s(["p"] * 2, ["a", "b"]) == [None, None] and "returned 1 values" in s.last_error
    g(["p"], ["a"])
    with pytest.raises(RuntimeError, match="broken.*3 batches"):
        g(["p"], ["a"])


# ---------------------------------------------------------------------- the game, scripted
class ScriptedBackend:
    """Answers by rule instead of sampling: proposals from a script, solver answers right for
    every ``right_every``-th sample; never emits EOS when ``endless`` (generation that never stops)."""

    def __init__(self, tok, proposals, right_every=2, endless=False):
        self.tok, self.proposals, self.right_every, self.endless = tok, list(proposals), right_every, endless
        self.calls = 0

    def generate_ids(self, prompts, sampling):
        outs = []
        for i, prompt in enumerate(prompts):
            if "Write one new" in prompt:
                text = self.proposals[self.calls % len(self.proposals)]
                self.calls += 1
            else:
                a, b = (int(x) for x in prompt.split("What is ")[1].split("?")[0].split(" + "))
                text = str(a + b if i % self.right_every == 0 else a + b + 1)
            ids = self.tok.encode(" " + text, add_special_tokens=False)
            ids = ids + [self.tok.eos_token_id] if not self.endless else (ids * 50)[:sampling.max_new_tokens]
            outs.append(ids)
        return [self.tok.encode(p, add_special_tokens=False) for p in prompts], outs

    def generate(self, prompts, sampling):
        return self.tok.batch_decode(self.generate_ids(prompts, sampling)[1], skip_special_tokens=True)


def test_rollout_fills_every_slot_and_counts_unparsable_proposals(micro):
    _, tok = micro
    env = ProposerSolverEnv(Arithmetic(), tok, chat=False, seed=0)
    backend = ScriptedBackend(tok, ["What is 12 + 34?", "nonsense", "What is 50 + 25?", "What is 61 + 17?"])
    from selftrain.modeling.generation import SamplingParams

    out = env.rollout(4, 4, backend, SamplingParams(max_new_tokens=8))
    assert len(out["completion_ids"]) == len(out["role"]) == 16  # 4 groups x 4, always
    assert out["role"].count("propose") == 4 and out["role"].count("solve") == 12
    m = env.pop_metrics()
    assert env.counts["proposed"] == 4 and env.counts["unparsable"] == 1
    assert m["env/valid_proposals"] == 0.75 and m["env/solve_rate"] == 0.5
    solved = {p.key for p, r in zip(out["problem"], out["role"]) if r == "solve"}
    assert solved == {"12+34", "50+25", "61+17"}
    # next step nothing parses: the solver slots replay the model's earlier problems
    backend.proposals = ["nonsense"]
    out = env.rollout(4, 4, backend, SamplingParams(max_new_tokens=8))
    assert out["role"].count("solve") == 12 and env.counts["replayed"] == 3
    # every proposal unparsable: the step still fills its slots (replay buffer, then proposer groups)
    bad = ProposerSolverEnv(Arithmetic(), tok, chat=False, seed=0)
    out = bad.rollout(4, 4, ScriptedBackend(tok, ["nothing"]), SamplingParams(max_new_tokens=8))
    assert len(out["completion_ids"]) == 16 and set(out["role"]) == {"propose"}
    assert bad.counts["slots_to_proposer"] == 3 and bad.counts["unparsable"] == 16


def test_each_process_of_a_launch_plays_problems_of_its_own(micro, monkeypatch):
    """Under torchrun every rank builds the environment; seeded alike, all ranks would roll out the
    same problems and the extra processes would add nothing. Rank 0 keeps a single process's."""
    from types import SimpleNamespace

    from selftrain.config import RunConfig
    from selftrain.modeling.generation import SamplingParams
    from selftrain.stages.selfplay import SelfplayStage

    model, tok = micro
    config = SelfplayConfig(env="tasks", family="arithmetic", problem_source="generator", max_steps=1)
    state = SimpleNamespace(seed=3, heldout=[], config=RunConfig(model={"preset": "tiny"}, stages=[{"pretrain": {}}]))

    def problems() -> list[str]:
        env, _ = SelfplayStage._grpo_env(config, model, tok, state)
        out = env.rollout(6, 2, ScriptedBackend(tok, []), SamplingParams(max_new_tokens=4))
        return [p.key for p in out["problem"]]

    single = problems()  # no RANK, no WORLD_SIZE: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = problems()
    monkeypatch.setenv("RANK", "1")
    other = problems()
    assert first == single and first != other
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("RANK", "3")  # a RANK left over in one process's environment changes nothing
    assert problems() == single


def test_proposer_is_shown_its_earlier_problems(micro):
    _, tok = micro
    env = ProposerSolverEnv(PythonPrograms(), tok, chat=False, seed=0)
    assert "written before" not in env.proposer_prompt()
    env._remember(env.family.random_problem(random.Random(0)), 0.5)
    prompt = env.proposer_prompt()
    assert "written before" in prompt and "def f(x):" in prompt and env.family.proposer_instruction in prompt


def test_generation_that_never_stops_is_capped(micro):
    _, tok = micro
    env = ProposerSolverEnv(Arithmetic(), tok, chat=False, source="generator", seed=0)
    from selftrain.modeling.generation import SamplingParams

    out = env.rollout(2, 4, ScriptedBackend(tok, [], endless=True), SamplingParams(max_new_tokens=8))
    assert all(len(c) == 8 for c in out["completion_ids"])
    assert len(out["completion_ids"]) == 8 and set(out["role"]) == {"solve"}


# ---------------------------------------------------------------------- no evaluation item is trained on
def _eval_pairs(rows) -> set[tuple[int, int]]:
    """The eval sums as unordered operand pairs, computed from the rows (not by the family)."""
    return {tuple(sorted(int(x) for x in r["question"].split(" + "))) for r in rows}


def _solver_pairs(out) -> list[tuple[int, int]]:
    return [tuple(sorted(int(x) for x in p.question.split(" + ")))
            for p, r in zip(out["problem"], out["role"]) if r == "solve"]


def test_arithmetic_canonical_key_orders_commutative_operands():
    fam = Arithmetic(digits=2, ops=("+", "-", "*"))
    assert fam.canonical(fam.parse("45 + 23")) == fam.canonical(fam.parse("23 + 45")) == "23+45"
    assert fam.canonical(fam.parse("45 * 23")) == fam.canonical(fam.parse("23 x 45"))
    assert fam.canonical(fam.parse("45 - 23")) != fam.canonical(fam.parse("23 - 45"))
    fam.exclude = frozenset(fam.exclusion_keys(["What is 23 + 45?", "no problem here"]))
    assert fam.exclude == {"23+45"} and fam.excluded(fam.parse("45 + 23")) and not fam.excluded(None)
    tiny = Arithmetic(digits=1)
    tiny.exclude = frozenset(f"{a}+{b}" for a in range(10) for b in range(a, 10))
    tiny.max_draws = 50
    with pytest.raises(SelftrainError, match="covers the family"):
        tiny.random_problem(random.Random(0))  # an exclusion covering the family is an error, not a hang


def test_generator_never_draws_an_eval_item_or_its_commuted_form(micro):
    from selftrain.modeling.generation import SamplingParams
    from selftrain.tasks.generators import arithmetic

    _, tok = micro
    rows = arithmetic(n=200, digits=2, ops=("+",), seed=1234)  # the builtin arith / arith-chat rows
    evals = _eval_pairs(rows)
    fam = Arithmetic(digits=2, ops=("+",))
    # without the exclusion, a generator seeded like the task replays its rows exactly
    rng = random.Random(1234)
    assert [fam.random_problem(rng).question for _ in range(100)] == [r["question"] for r in rows[:100]]
    fam.exclude = frozenset(eval_problem_keys(fam, ["arith", "arith-chat"]))
    assert len(fam.exclude) == len(evals) > 190
    assert eval_problem_keys(StringTransforms(), ["arith"]) == set()  # rows of another kind add nothing

    sampling = SamplingParams(max_new_tokens=8)
    env = ProposerSolverEnv(fam, tok, chat=False, source="generator", seed=1234)  # the task's own seed, on purpose
    plain = ProposerSolverEnv(Arithmetic(digits=2, ops=("+",)), tok, chat=False, source="generator", seed=1234)
    emitted, control = [], []
    for _ in range(100):
        emitted += _solver_pairs(env.rollout(8, 2, ScriptedBackend(tok, []), sampling))
        control += _solver_pairs(plain.rollout(8, 2, ScriptedBackend(tok, []), sampling))
    assert len(emitted) == 100 * 8 * 2 and not [pr for pr in emitted if pr in evals]  # checked against the rows
    assert env.counts["eval_overlap"] == 0 and env.counts["eval_redraws"] > 0
    assert sum(pr in evals for pr in control) > 0  # the same check does catch overlap without the exclusion
    # and the env's own stream (same integer seed as the task) is not the task's stream
    assert control[:20] != [tuple(sorted(int(x) for x in r["question"].split(" + "))) for r in rows[:20]]
    assert env.pop_metrics()["env/eval_overlap_total"] == 0


def test_proposals_of_eval_items_are_excluded_and_counted(micro):
    from selftrain.modeling.generation import SamplingParams
    from selftrain.tasks.generators import arithmetic

    _, tok = micro
    rows = arithmetic(n=200, digits=2, ops=("+",), seed=1234)
    evals = _eval_pairs(rows)
    a, b = next((int(x), int(y)) for x, y in (r["question"].split(" + ") for r in rows) if x != y)
    fresh = [(c, d) for c in range(10, 100) for d in range(c + 1, 100) if (c, d) not in evals][:2]
    fam = Arithmetic(digits=2, ops=("+",))
    fam.exclude = frozenset(eval_problem_keys(fam, ["arith"]))
    env = ProposerSolverEnv(fam, tok, chat=False, seed=0)
    script = [f"What is {a} + {b}?", f"What is {b} + {a}?"] + [f"What is {c} + {d}?" for c, d in fresh]
    backend = ScriptedBackend(tok, script)
    sampling = SamplingParams(max_new_tokens=8)
    out = env.rollout(3, 4, backend, sampling)  # one proposer group of 4, two solver groups
    assert env.counts["excluded_eval"] == 2 and env.counts["unparsable"] == 0
    proposed = [p for p, r in zip(out["problem"], out["role"]) if r == "propose"]
    assert proposed[:2] == [None, None] and all(p is not None for p in proposed[2:])
    valid = env.rewards()["proposal_valid"]([""] * len(out["role"]), [""] * len(out["role"]),
                                           role=out["role"], problem=out["problem"])
    assert [v for v, r in zip(valid, out["role"]) if r == "propose"] == [0.0, 0.0, 1.0, 1.0]  # scored as invalid
    assert env.pop_metrics()["env/valid_proposals"] == 0.5
    assert set(_solver_pairs(out)) <= set(fresh) and not set(_solver_pairs(out)) & evals
    assert not any(k in fam.exclude for k in map(fam.canonical, env.buffer.values()))  # never in the replay buffer
    backend.proposals = script[:2]  # only eval items now: dropped every time, slots replay earlier problems
    for _ in range(3):
        out = env.rollout(3, 4, backend, sampling)
        assert out["role"].count("solve") == 8  # replayed from the buffer
        assert not set(_solver_pairs(out)) & evals
    assert env.counts["excluded_eval"] == 2 + 3 * 4 and env.counts["eval_overlap"] == 0


def test_chatterbot_seed_openers_load():
    from selftrain.stages.selfplay.dialogue import chatterbot_seeds

    seeds = chatterbot_seeds()
    assert len(seeds) > 1000 and all(len(s) == 1 and s[0] for s in seeds)


# ---------------------------------------------------------------------- GRPO learns
class HalfVocabEnv(EnvMetrics):
    """Trivially learnable: the reward is the share of completion tokens from the lower half of
    the vocabulary. A random model starts near 0.5; GRPO should push it up."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def rollout(self, groups, g, backend, sampling):
        ids_in, ids_out = backend.generate_ids(["the cat"] * (groups * g), sampling)
        return {"prompt_ids": ids_in, "completion_ids": ids_out}

    def rewards(self):
        half = len(self.tok) // 2

        def low_tokens(prompts, completions, completion_ids, **_):
            return [sum(t < half for t in ids) / max(1, len(ids)) for ids in completion_ids]

        return {"low_tokens": low_tokens}


def test_grpo_reward_rises_on_trivially_learnable_env(micro, tmp_path):
    model, tok = build_initial(ModelConfig(preset="tiny", vocab_size=320, architecture=MICRO_ARCH), TEXTS, 0)[:2]
    torch.manual_seed(0)
    env = HalfVocabEnv(tok)
    opts = SelfplayConfig(max_steps=30, learning_rate=1e-2, groups_per_step=2, num_generations=8,
                          max_completion_length=8, temperature=1.0, precision="fp32")
    rewards = {k: (f, 1.0) for k, f in env.rewards().items()}
    _, records, _ = grpo_train(model, tok, env, rewards, opts=grpo_options(opts), out_dir=tmp_path / "t", seed=0,
                               log=lambda r: None, stage_key="t")
    curve = [r["rewards/low_tokens/mean"] for r in records]
    first, last = sum(curve[:6]) / 6, sum(curve[-6:]) / 6
    assert last > first + 0.15, curve


# ---------------------------------------------------------------------- the stage through the runner
def _run(tmp_path, stage_opts, corpus_text=None):
    from selftrain.config import config_from_dict
    from selftrain.runner import Runner

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text or make_corpus())
    cfg = micro_config(tmp_path / "run", corpus, [{"selfplay": stage_opts}], guard={"tolerance": 10.0})
    manifest = Runner(config_from_dict(cfg)).run()
    return manifest["stages"][0], tmp_path / "run" / "stages" / manifest["stages"][0]["key"]


COMMON = {"max_steps": 2, "num_generations": 4, "groups_per_step": 2, "learning_rate": 1e-3, "precision": "fp32"}


def test_stage_tasks_env_writes_steps_and_plot(tmp_path):
    entry, stage_dir = _run(tmp_path, {**COMMON, "env": "tasks", "problem_source": "generator"})
    assert entry["status"] in ("accepted", "rolled_back"), entry
    steps = [json.loads(line) for line in (stage_dir / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and "rewards/solver_correct/mean" in steps[0] and "env/solve_rate" in steps[0]
    assert (stage_dir / "selfplay.png").stat().st_size > 1000
    assert entry["stage_metrics"]["env/steps_total"] == 2
    assert entry["stage_metrics"]["env/eval_overlap_total"] == 0
    report = (stage_dir.parent.parent / "report.md").read_text()
    assert "Self-play `tasks` (grpo)" in report and "selfplay.png" in report and "solve_rate" in report
    assert entry["artefacts"] == {"selfplay_plot": f"stages/{entry['key']}/selfplay.png"}


def test_stage_excludes_the_runs_eval_items_and_reports_zero_overlap(tmp_path):
    """A run evaluating one-digit additions: the stage's generator, one digit too, must skip its rows."""
    from selftrain.tasks.generators import arithmetic

    args = {"n": 40, "digits": 1, "ops": ["+"], "seed": 1234}
    task = {"name": "add1", "output_type": "generate", "data": {"generator": "arithmetic", "args": args},
            "doc_to_text": "Question: What is {{question}}?\nAnswer:", "doc_to_target": "answer",
            "input_field": "question", "match": "numeric", "generation": {"max_new_tokens": 4, "until": ["\n"]}}
    (tmp_path / "add1.yaml").write_text(json.dumps(task))  # JSON is YAML
    entry, stage_dir = _run_with_eval(tmp_path, {**COMMON, "max_steps": 3, "env": "tasks",
                                                 "problem_source": "generator", "family_options": {"digits": 1}},
                                      eval_tasks=[{"task": str(tmp_path / "add1.yaml"), "limit": 8}])
    assert entry["status"] in ("accepted", "rolled_back"), entry
    m = entry["stage_metrics"]
    assert m["env/eval_excluded_keys"] == len(_eval_pairs(arithmetic(**args)))
    assert m["env/eval_overlap_total"] == 0 and m["env/eval_redraws_total"] > 0


def _run_with_eval(tmp_path, stage_opts, eval_tasks):
    from selftrain.config import config_from_dict
    from selftrain.runner import Runner

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    cfg = micro_config(tmp_path / "run", corpus, [{"selfplay": stage_opts}], guard={"tolerance": 10.0},
                       eval={"tasks": eval_tasks})
    manifest = Runner(config_from_dict(cfg)).run()
    return manifest["stages"][0], tmp_path / "run" / "stages" / manifest["stages"][0]["key"]


def test_stage_dialogue_env_with_model_openers(tmp_path):
    entry, stage_dir = _run(tmp_path, {**COMMON, "env": "dialogue", "seeds": "model", "max_completion_length": 8,
                                       "reward_weights": {"relevance": 0.5}, "beta": 0.05})
    assert entry["status"] in ("accepted", "rolled_back"), entry
    steps = [json.loads(line) for line in (stage_dir / "steps.jsonl").read_text().splitlines()]
    assert {"rewards/coherence/mean", "rewards/relevance/mean", "rewards/non_repetition/mean", "kl"} <= set(steps[0])
    assert entry["stage_metrics"]["env/conversations_started_total"] >= 2


def test_stage_spin_makes_real_vs_own_pairs(tmp_path, pool_lists_refused):
    entry, stage_dir = _run(tmp_path, {"env": "spin", "num_prompts": 8, "max_steps": 2, "batch_size": 4,
                                       "prefix_tokens": 8, "continuation_tokens": 8, "precision": "fp32",
                                       "learning_rate": 1e-4})
    assert entry["status"] in ("accepted", "rolled_back"), entry
    pairs = [json.loads(line) for line in (stage_dir / "pairs-1.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    corpus = make_corpus()
    assert all(p["prompt"].strip().split()[0].lower() in corpus.lower() for p in pairs)
    assert entry["stage_metrics"]["pairs"] == len(pairs)


def test_stage_self_reward_judges_its_own_answers(tmp_path):
    entry, stage_dir = _run(tmp_path, {"env": "self_reward", "num_prompts": 6, "num_generations": 3, "max_steps": 2,
                                       "batch_size": 2, "min_margin": 0.0, "max_completion_length": 8,
                                       "precision": "fp32"})
    assert entry["status"] in ("accepted", "rolled_back"), entry
    rounds = entry["stage_metrics"]["rounds"]
    assert rounds[0]["questions_written"] == 6 and "mean_judge_score" in rounds[0]


def test_bad_selfplay_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="played with grpo"):
        SelfplayConfig(env="tasks", algorithm="dpo")
    with pytest.raises(SelftrainError, match="spin needs corpus texts"):
        _run(tmp_path, {"env": "spin", "prefix_tokens": 100, "continuation_tokens": 100})
    assert not (tmp_path / "run").exists()  # preflight failed before the run directory was made
    with pytest.raises(SelftrainError, match="ops must be some of"):
        _run(tmp_path, {"env": "tasks", "family": "arithmetic", "family_options": {"ops": ["/"]}})


def test_a_raising_reward_is_skipped_and_the_run_survives(tmp_path, monkeypatch):
    from selftrain.stages.selfplay import proposer_solver

    original = proposer_solver.ProposerSolverEnv.rewards

    def with_broken(self):
        fns = original(self)

        def flaky(prompts, completions, **_):
            raise RuntimeError("judge offline")

        return {**fns, "proposal_valid": flaky}

    monkeypatch.setattr(proposer_solver.ProposerSolverEnv, "rewards", with_broken)
    entry, stage_dir = _run(tmp_path, {**COMMON, "env": "tasks", "problem_source": "generator"})
    assert entry["status"] in ("accepted", "rolled_back")
    assert entry["stage_metrics"]["skipped/proposal_valid"] == 2 * 8
