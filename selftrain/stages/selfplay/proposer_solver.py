"""Environment `tasks`: proposer/solver self-play on a verifiable task family (Absolute Zero style).

Each GRPO step has ``groups`` slots of ``G`` completions. Some slots are *proposer* groups: the
model writes G problems (shown a few of its earlier ones, so it varies them). The family parses
each and computes its answer; every valid problem is then solved G times by the model. Those
solutions both score the proposal — learnability, highest when the solve rate is neither 0 nor 1
— and fill the *solver* groups, frontier problems first (a group whose answers are all right or
all wrong carries no GRPO signal). Slots still empty take problems from the replay buffer of
earlier proposals, and only if that is empty too become extra proposer groups.

With ``problem_source: generator`` the family's random generator replaces the proposer (the
comparison arm of ``bench/selfplay_arith.py``).

No evaluation item is ever a training problem: the family's ``exclude`` set (built by the stage from
the run's ``eval.tasks`` with ``eval_problem_keys``) makes the generator draw again, and a proposal
inside it is dropped (counted ``excluded_eval``, rewarded as an invalid proposal, never solved).
Every solver problem emitted for training is checked against the set once more and counted in
``eval_overlap`` (0 by construction; the count is the evidence).
"""

from __future__ import annotations

import random
from collections import Counter

from selftrain.modeling.chat import render_prompt
from selftrain.stages.selfplay.env import EnvMetrics
from selftrain.tasks.families import Problem


def eval_problem_keys(family, task_refs, texts: list[str] | None = None) -> set[str]:
    """Canonical keys of the rows of the evaluation tasks ``task_refs`` that parse as problems of
    ``family`` (a row's input field, else its rendered prompt); rows of other kinds add nothing."""
    from selftrain.tasks import load_task

    keys: set[str] = set()
    for ref in task_refs:
        task = load_task(ref)
        for row in task.docs(texts):
            value = row.get(task.input_field) if task.input_field else None
            found = family.exclusion_keys([value]) if value is not None else set()
            keys |= found or family.exclusion_keys([task.text(row)])
    return keys


def learnability(solve_rate: float | None, kind: str = "azr") -> float:
    """0 for problems always or never solved; otherwise ``1 - rate`` (azr: harder pays more while
    still solvable, Zhao et al. 2025) or ``4 rate (1 - rate)`` (variance: peaks at one half)."""
    if solve_rate is None or solve_rate <= 0.0 or solve_rate >= 1.0:
        return 0.0
    return 1.0 - solve_rate if kind == "azr" else 4.0 * solve_rate * (1.0 - solve_rate)


class ProposerSolverEnv(EnvMetrics):
    def __init__(self, family, tokenizer, *, chat: bool, source: str = "model", train_proposer: bool = True,
                 propose_fraction: float = 0.25, examples_in_prompt: int = 3, buffer_size: int = 512,
                 learnability_kind: str = "azr", proposal_tokens: int = 32, proposal_temperature: float = 1.0,
                 seed: int = 0):
        self.family, self.tok, self.chat = family, tokenizer, chat
        self.source, self.train_proposer = source, train_proposer and source == "model"
        self.propose_fraction, self.examples_in_prompt = propose_fraction, examples_in_prompt
        self.buffer: dict[str, Problem] = {}  # key -> problem, in insertion order (oldest first)
        self.rates: dict[str, float] = {}  # key -> the solve rate last measured
        self.buffer_size, self.learnability_kind = buffer_size, learnability_kind
        self.proposal_tokens, self.proposal_temperature = proposal_tokens, proposal_temperature
        # a stream of its own: an integer seed would replay a task generator seeded alike (arith's rows
        # are random.Random(1234) draws); the exclusion set, not the seed, is the guarantee
        self.rng = random.Random(f"selfplay-tasks-{seed}")
        self.trained: set[str] = set()  # canonical keys of every solver problem emitted for training
        super().__init__()
        self.counts.update({"eval_overlap": 0, "excluded_eval": 0})

    # ------------------------------------------------------------------ prompts
    def render(self, user_text: str) -> str:
        return render_prompt(self.tok, user_text, chat=self.chat, plain=f"{user_text}\n")

    def solver_prompt(self, p: Problem) -> str:
        return self.render(self.family.solver_question(p)) if self.chat else \
            f"Question: {self.family.solver_question(p)}\nAnswer:"

    def _frontier_first(self, keys: list[str]) -> list[str]:
        """Buffer keys in random order, those last solved sometimes (0 < rate < 1) first, then
        those never solved, then the always-solved ones."""
        rank = {k: (0 if 0 < self.rates.get(k, 1.0) < 1 else 1 if self.rates.get(k, 1.0) == 0 else 2) for k in keys}
        return sorted(keys, key=lambda k: (rank[k], self.rng.random()))

    def proposer_prompt(self) -> str:
        """The instruction plus a few earlier problems, frontier ones first: a proposer shown what
        is hard for its solver writes more problems like them (measured: shown random earlier
        problems it drifts to easy ones and most solver groups lose their signal)."""
        text = self.family.proposer_instruction
        shown = [self.buffer[k] for k in self._frontier_first(list(self.buffer))[:self.examples_in_prompt]]
        if shown:
            text += "\nProblems written before (write a different one):\n" + "\n".join(
                f"- {self.family.example(p)}" for p in shown)
        return self.render(text)

    # ------------------------------------------------------------------ one step
    def rollout(self, groups: int, g: int, backend, sampling) -> dict:
        solver_slots = groups - (max(1, round(groups * self.propose_fraction)) if self.train_proposer else 0)
        out = {k: [] for k in ("prompt_ids", "completion_ids", "role", "problem", "solve_rate")}
        stats = Counter()

        if self.source == "generator":
            redraws = self.family.redraws
            problems = [self.family.random_problem(self.rng) for _ in range(solver_slots)]
            stats["eval_redraws"] += self.family.redraws - redraws
            solved = self._solve(problems, g, backend, sampling)
            self._emit_solver(out, solved, g)
            self._record(stats, [], solved, groups)
            return out

        proposer_groups = groups - solver_slots if self.train_proposer else 1
        proposals = self._propose(proposer_groups, g, backend, sampling, stats)
        unique = {p.key: p for _, _, p in proposals if p is not None}
        solved = self._solve(list(unique.values()), g, backend, sampling)
        rate = {key: s[3] for key, s in zip(unique, solved)}
        for p in unique.values():
            self._remember(p, rate[p.key])

        # solver groups: this step's frontier problems, then earlier problems that were not always
        # solved (re-solved now), then the rest of this step's; a group of all-equal rewards teaches nothing
        frontier = [x for x in solved if 0 < x[3] < 1]
        self.rng.shuffle(frontier)
        chosen = frontier[:solver_slots]
        missing = solver_slots - len(chosen)
        if missing:
            old = [k for k in self._frontier_first([k for k in self.buffer if k not in unique])
                   if self.rates.get(k, 1.0) < 1][:missing]
            replay = self._solve([self.buffer[k] for k in old], g, backend, sampling)
            for x in replay:
                self.rates[x[0].key] = x[3]
            stats["replayed"] += len(replay)
            chosen += replay
            missing = solver_slots - len(chosen)
        if missing:
            rest = [x for x in solved if not 0 < x[3] < 1]
            self.rng.shuffle(rest)
            chosen += rest[:missing]
            missing = solver_slots - len(chosen)
        emitted = proposals if self.train_proposer else []
        if missing:  # nothing to solve yet: these slots become proposer groups
            extra = self._propose(missing, g, backend, sampling, stats)
            more = {p.key: p for _, _, p in extra if p is not None and p.key not in unique}
            for p, s in zip(more.values(), self._solve(list(more.values()), g, backend, sampling)):
                rate[p.key] = s[3]
                self._remember(p, s[3])
            proposals, emitted = proposals + extra, emitted + extra
            stats["slots_to_proposer"] += missing

        for prompt_ids, completion_ids, p in emitted:
            out["prompt_ids"].append(prompt_ids)
            out["completion_ids"].append(completion_ids)
            out["role"].append("propose")
            out["problem"].append(p)
            out["solve_rate"].append(rate.get(p.key) if p is not None else None)
        self._emit_solver(out, chosen, g)
        self._record(stats, proposals, chosen, groups, rate)
        return out

    def _propose(self, n_groups, g, backend, sampling, stats):
        # one prompt per group (the G proposals of a group share it), each showing other examples
        prompts = [prompt for _ in range(n_groups) for prompt in [self.proposer_prompt()] * g]
        ids_in, ids_out = backend.generate_ids(prompts, _with(sampling, max_new_tokens=self.proposal_tokens,
                                                                    temperature=self.proposal_temperature))
        texts = self.tok.batch_decode(ids_out, skip_special_tokens=True)
        parsed = [self.family.parse(t) for t in texts]
        stats["proposed"] += len(parsed)
        stats["unparsable"] += sum(p is None for p in parsed)
        excluded = [self.family.excluded(p) for p in parsed]  # an evaluation item: dropped, scored as invalid
        stats["excluded_eval"] += sum(excluded)
        parsed = [None if x else p for p, x in zip(parsed, excluded)]
        return list(zip(ids_in, ids_out, parsed))

    def _solve(self, problems: list[Problem], g, backend, sampling):
        """[(problem, prompt_ids, completion_ids list, solve_rate)] from G sampled answers each."""
        if not problems:
            return []
        prompts = [self.solver_prompt(p) for p in problems for _ in range(g)]
        ids_in, ids_out = backend.generate_ids(prompts, sampling)
        texts = self.tok.batch_decode(ids_out, skip_special_tokens=True)
        result = []
        for i, p in enumerate(problems):
            span = slice(i * g, (i + 1) * g)
            correct = [self.family.check(t, p) for t in texts[span]]
            result.append((p, ids_in[i * g], ids_out[span], sum(correct) / g))
        return result

    def _emit_solver(self, out, solved, g):
        for p, prompt_ids, completions, rate in solved:
            key = self.family.canonical(p)
            self.trained.add(key)
            self.counts["eval_overlap"] += key in self.family.exclude  # measured on what is emitted
            for c in completions:
                out["prompt_ids"].append(prompt_ids)
                out["completion_ids"].append(c)
                out["role"].append("solve")
                out["problem"].append(p)
                out["solve_rate"].append(rate)

    def _remember(self, p: Problem, rate: float) -> None:
        self.buffer.pop(p.key, None)
        self.buffer[p.key], self.rates[p.key] = p, rate
        while len(self.buffer) > self.buffer_size:
            self.rates.pop(self.buffer.pop(next(iter(self.buffer))).key, None)

    def _record(self, stats, proposals, solved, groups, rate=None):
        rates = [s[3] for s in solved]
        valid = [p for _, _, p in proposals if p is not None]
        m = {
            "solve_rate": sum(rates) / len(rates) if rates else float("nan"),
            "frontier_fraction": sum(0 < r < 1 for r in rates) / len(rates) if rates else float("nan"),
        }
        if proposals:
            prop_rates = [rate[p.key] for p in valid if rate and p.key in rate]
            m.update({
                "valid_proposals": len(valid) / len(proposals),
                "unique_proposals": len({p.key for p in valid}) / len(proposals),
                # difficulty of what the proposer writes: its own failure rate on its problems
                "proposal_difficulty": 1 - sum(prop_rates) / len(prop_rates) if prop_rates else float("nan"),
                "proposal_learnability": (sum(learnability(r, self.learnability_kind) for r in prop_rates)
                                          / len(prop_rates)) if prop_rates else float("nan"),
            })
        self.counts.update(stats)
        self.counts["steps"] += 1
        for k, v in m.items():
            self.note(k, v)

    # ------------------------------------------------------------------ rewards (TRL convention)
    def rewards(self):
        family, kind = self.family, self.learnability_kind

        def solver_correct(prompts, completions, role, problem, **_):
            return [float(family.check(c, p)) if r == "solve" else None
                    for c, r, p in zip(completions, role, problem)]

        def proposer_learnability(prompts, completions, role, solve_rate, **_):
            return [learnability(s, kind) if r == "propose" else None for r, s in zip(role, solve_rate)]

        def proposal_valid(prompts, completions, role, problem, **_):
            return [float(p is not None) if r == "propose" else None for r, p in zip(role, problem)]

        return {"solver_correct": solver_correct, "proposer_learnability": proposer_learnability,
                "proposal_valid": proposal_valid}


def _with(sampling, **changes):
    return type(sampling)(**{**sampling.__dict__, **changes})
