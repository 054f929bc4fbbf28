"""Stage `selfplay` — the model improves by playing against itself (RL with self-play).

Four environments, one option each:

- ``tasks``: proposer/solver on a verifiable family (arithmetic, strings, python); GRPO.
- ``dialogue``: self-conversation from seed dialogues or topics; responses rewarded for coherence,
  relevance and non-repetition; GRPO.
- ``self_reward``: the model judges its own candidate answers; best vs worst -> DPO.
- ``spin``: real continuation vs the model's own -> DPO.

Rewards come from code (verifiers), from the model itself (judge, frozen start model) or from
comparison with real data; never from labels. Per-step metrics go to ``steps.jsonl`` and plots to
``selfplay.png`` in the stage directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from rich.console import Console

from selftrain import distributed
from selftrain.errors import SelftrainError
from selftrain.modeling.factory import save_checkpoint
from selftrain.stages.base import RunState, Stage, StageConfig, StageResult, fmt, register
from selftrain.training.adapters import LoraOptions, check_adapter

GRPO_ENVS = ("tasks", "dialogue")
DPO_ENVS = ("self_reward", "spin")
# The reward names each GRPO env's rewards() returns (checked against them by a test), so a
# reward_weights typo is refused when the config loads instead of mid-run.
REWARD_NAMES = {"tasks": ("solver_correct", "proposer_learnability", "proposal_valid"),
                "dialogue": ("coherence", "relevance", "non_repetition")}


class SelfplayConfig(StageConfig):
    env: Literal["tasks", "dialogue", "self_reward", "spin"] = Field(
        "tasks", description="Which game: tasks, dialogue (GRPO); self_reward, spin (DPO).")
    algorithm: Literal["auto", "grpo", "dpo"] = Field(
        "auto", description="auto: GRPO for tasks/dialogue, DPO for self_reward/spin (the only pairings that fit).")
    max_steps: int = Field(50, ge=1, description="Optimizer steps (GRPO steps, or DPO steps per round).")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (1e-5 held steady on SmolLM2; 2e-5 collapsed once).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the schedule.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay to 0 over max_steps (measured: a constant 1e-5 peaked then drifted on SmolLM2).")
    beta: float = Field(0.0, ge=0, description="GRPO: KL penalty to the start model (0 loads no reference copy).")
    num_generations: int = Field(8, ge=2, description="Completions per prompt: a GRPO group, or candidates judged.")
    groups_per_step: int = Field(4, ge=1, description="GRPO: prompt groups per optimizer step.")
    max_completion_length: int | None = Field(
        None, ge=1, description="Token cap of a completion; default per env: tasks 16, dialogue 32, self_reward 64.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature of rollouts (TRL scores with the same).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field("dapo", description="TRL's GRPO loss normalisation.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide advantages by the group's std.")
    reward_weights: dict[str, float] = Field(
        default_factory=dict, description="Weight per reward name (e.g. coherence: 1, relevance: 0.5); unnamed ones weigh 1.")
    max_reward_failures: int = Field(5, ge=1, description="Batches a reward may fail (skipped, counted) before the stage stops.")
    generation_batch_size: int = Field(64, ge=1, description="Prompts sampled together by the generation backend.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 where the device has it.")
    chat: bool | Literal["auto"] = Field("auto", description="Render prompts with the chat template where the model has one.")
    adapter: LoraOptions | None = Field(
        None, description="LoRA adapter ({type: lora, r, alpha, dropout, target_modules}), merged on save; null: full fine-tuning.")
    # --- env: tasks
    family: Literal["arithmetic", "strings", "python"] = Field("arithmetic", description="tasks: the verifiable task family.")
    family_options: dict[str, Any] = Field(default_factory=dict, description="tasks: options of the family (e.g. digits: 2, ops: ['+']).")
    problem_source: Literal["model", "generator"] = Field(
        "model", description="tasks: problems proposed by the model, or drawn from the family's random generator.")
    train_proposer: bool = Field(True, description="tasks: also train the proposer on learnability (else it only proposes).")
    propose_fraction: float = Field(0.25, gt=0, lt=1, description="tasks: share of groups that are proposer groups.")
    learnability: Literal["azr", "variance"] = Field("azr", description="tasks: proposer reward shape (1-p, or 4p(1-p)) for 0<p<1.")
    proposal_temperature: float = Field(1.0, gt=0, description="tasks: sampling temperature of proposals (more varied problems than the solver's).")
    # --- env: dialogue
    seeds: Literal["chatterbot", "model"] = Field("chatterbot", description="dialogue: seed conversations from chatterbot-corpus, or model-written topics.")
    topics: list[str] = Field(default_factory=lambda: ["travel", "food", "science", "music", "sports", "books"],
                              description="dialogue/self_reward: topics the model opens conversations or questions about.")
    turns: int = Field(2, ge=1, le=8, description="dialogue: earlier turns kept as context for the next response.")
    embedding_model: str | None = Field(None, description="dialogue: local encoder dir for relevance embeddings; default: the frozen start model's mean-pooled states.")
    # --- DPO envs
    num_prompts: int = Field(64, ge=1, description="self_reward/spin: prompts (or corpus prefixes) per round.")
    rounds: int = Field(1, ge=1, description="self_reward/spin: generate-pairs-then-DPO rounds (iterative, as both papers).")
    dpo_beta: float = Field(0.1, gt=0, description="DPO: strength of the implicit KL to the reference (start of round) model.")
    batch_size: int = Field(8, ge=1, description="DPO: pairs per optimizer step.")
    min_margin: float = Field(0.5, ge=0, description="self_reward: best and worst judge scores must differ by this to make a pair.")
    prefix_tokens: int = Field(32, ge=4, description="spin: tokens of real text given as the prefix.")
    continuation_tokens: int = Field(32, ge=4, description="spin: tokens of real continuation (and generated ones) per pair.")

    @model_validator(mode="after")
    def _fits(self):
        grpo = self.env in GRPO_ENVS
        if self.algorithm == "dpo" and grpo or self.algorithm == "grpo" and not grpo:
            raise ValueError(f"env {self.env} is played with {'grpo' if grpo else 'dpo'}, not {self.algorithm}")
        return self

    @model_validator(mode="after")
    def _known_names(self):
        from selftrain.config import unknown_name

        for name in self.reward_weights:
            if name not in REWARD_NAMES.get(self.env, ()):
                raise ValueError(f"reward_weights of env {self.env}: " + (
                    unknown_name(name, REWARD_NAMES[self.env], what="reward") if self.env in REWARD_NAMES
                    else "this env has no reward functions to weigh (it makes preference pairs)"))
        if self.embedding_model is not None and not Path(self.embedding_model).is_dir():
            raise ValueError(f"embedding_model {self.embedding_model!r} is not a directory (a local encoder "
                             "saved with save_pretrained)")
        return self

    @property
    def completion_tokens(self) -> int:
        return self.max_completion_length or {"tasks": 16, "dialogue": 32}.get(self.env, 64)

    @property
    def optimiser(self) -> str:
        return "grpo" if self.env in GRPO_ENVS else "dpo"


@register
class SelfplayStage(Stage):
    name = "selfplay"
    Config = SelfplayConfig
    requires_causal = True  # plays by generating

    def runs_model_code(self, config) -> bool:
        return config.env == "tasks" and config.family == "python"

    def preflight(self, config, *, model, tokenizer, kind, train_texts):
        check_adapter(config.adapter, model)
        if config.env == "tasks":
            from selftrain.tasks.families import make_family

            make_family(config.family, **config.family_options)
        if config.env == "dialogue" and config.seeds == "chatterbot":
            from selftrain.stages.selfplay.dialogue import chatterbot_seeds

            chatterbot_seeds(limit=1)
        if config.env == "spin":
            from selftrain.stages.selfplay.preference import spin_pairs_possible

            spin_pairs_possible(tokenizer, train_texts, config)

    def run(self, state: RunState, config: SelfplayConfig) -> StageResult:
        console = Console(stderr=True)
        model, tokenizer = state.load_model()
        if config.optimiser == "grpo":
            from selftrain.stages.selfplay.grpo import grpo_options
            from selftrain.training.grpo import grpo_train

            env, rewards = self._grpo_env(config, model, tokenizer, state)
            console.print(f"selfplay/{config.env}: GRPO, {config.max_steps} steps × {config.groups_per_step} groups "
                          f"× {config.num_generations}; rewards {', '.join(f'{k}×{w}' for k, (_, w) in rewards.items())}")
            model, records, guarded = grpo_train(model, tokenizer, env, rewards, opts=grpo_options(config),
                                                 out_dir=state.stage_dir / "trainer", seed=state.seed,
                                                 log=state.log, stage_key=state.stage_key,
                                                 report_to=state.config.run.report_to)
            metrics = env_summary(env, records, rewards, guarded)
        else:
            from selftrain.stages.selfplay.preference import dpo_selfplay
            from selftrain.training.grpo import summarize

            model, records, metrics = dpo_selfplay(model, tokenizer, state, config, console)
            metrics.update(summarize(records, ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                                               "rewards/rejected"]))
            if model is None:  # every round's pairs came out empty: nothing to train, counted in metrics
                console.print(f"[yellow]selfplay/{config.env}: no preference pairs; the model is unchanged[/]")
                return StageResult(metrics={"env": config.env, "algorithm": "dpo", **metrics})
        _write_steps(state.stage_dir, records)
        from selftrain.stages.selfplay.plots import plot_steps

        plot = plot_steps(records, state.stage_dir / "selfplay.png", title=f"selfplay/{config.env}")
        ckpt = save_checkpoint(model, tokenizer, state.stage_dir / "checkpoint")
        return StageResult(checkpoint=ckpt, artefacts={"selfplay_plot": plot} if plot else {},
                           metrics={"env": config.env, "algorithm": config.optimiser, **metrics})

    def report(self, entry: dict) -> str:
        """First vs last quarter of steps for every logged signal, the env's counts, the plot."""
        m = entry["stage_metrics"]
        if not m.get("env"):
            return ""
        lines = [f"Self-play `{m['env']}` ({m.get('algorithm')}).", ""]
        firsts = sorted(k[:-len("/first")] for k in m if k.endswith("/first"))
        if firsts:
            lines += ["| signal | first quarter of steps | last quarter |", "|---|---|---|"]
            lines += [f"| {k} | {fmt(m.get(k + '/first'), 3)} | {fmt(m.get(k + '/last'), 3)} |" for k in firsts]
        counts = {k: v for k, v in m.items() if k.endswith("_total") or k.startswith("skipped/")}
        if counts:
            lines += ["", "Counts: " + ", ".join(f"{k.removeprefix('env/')} {v}" for k, v in sorted(counts.items()))
                      + "."]
        for r in m.get("rounds", []):
            lines.append("- round: " + ", ".join(f"{k} {fmt(v, 3) if isinstance(v, float) else v}"
                                                 for k, v in r.items()))
        if (entry.get("artefacts") or {}).get("selfplay_plot"):
            lines += ["", f"![{entry['key']}]({entry['artefacts']['selfplay_plot']})"]
        return "\n".join(lines)

    @staticmethod
    def _grpo_env(config, model, tokenizer, state):
        from selftrain.modeling.chat import use_chat

        chat = use_chat(config.chat, tokenizer)
        # each process of a launch plays problems of its own (rank 0 those of a single process):
        # alike, every rank would sample the same rollouts and the extra processes would add nothing
        env_seed = state.seed + 7919 * (distributed.rank() if distributed.world_size() > 1 else 0)
        if config.env == "tasks":
            from selftrain.stages.selfplay.proposer_solver import (
                ProposerSolverEnv,
                eval_problem_keys,
            )
            from selftrain.tasks.families import make_family

            options = dict(config.family_options)
            if config.family == "python":  # its programs run in the sandbox, at the run's least isolation
                options["min_isolation"] = state.config.sandbox.min_isolation
            family = make_family(config.family, **options)
            # the run's evaluation items (commuted sums included) are never training problems
            family.exclude = frozenset(eval_problem_keys(family, [t.task for t in state.config.eval.tasks],
                                                         state.heldout))
            env = ProposerSolverEnv(family, tokenizer, chat=chat,
                                    source=config.problem_source, train_proposer=config.train_proposer,
                                    propose_fraction=config.propose_fraction, learnability_kind=config.learnability,
                                    proposal_temperature=config.proposal_temperature, seed=env_seed)
        else:
            from selftrain.stages.selfplay.dialogue import DialogueEnv

            env = DialogueEnv.build(config, model, tokenizer, chat=chat, seed=env_seed)
        fns = env.rewards()
        unknown = set(config.reward_weights) - set(fns)
        if unknown:
            raise SelftrainError(f"selfplay.reward_weights names {sorted(unknown)}; env {config.env} has {sorted(fns)}")
        return env, {name: (fn, config.reward_weights.get(name, 1.0)) for name, fn in fns.items()}


def env_summary(env, records, rewards, guarded) -> dict:
    from selftrain.training.grpo import summarize

    keys = [f"rewards/{name}/mean" for name in rewards] + ["kl", "env/solve_rate", "env/proposal_difficulty",
                                                            "env/valid_proposals", "completions/clipped_ratio"]
    out = summarize(records, keys)
    out.update({f"env/{k}_total": v for k, v in env.counts.items()})
    if getattr(env, "family", None) is not None:
        out["env/eval_excluded_keys"] = len(env.family.exclude)
    out.update({f"skipped/{g.__name__}": g.skipped for g in guarded if g.skipped})
    out["steps"] = len(records)
    return out


def _write_steps(stage_dir, records: list[dict]) -> None:
    from selftrain.workspace import atomic_write_text

    atomic_write_text(stage_dir / "steps.jsonl", "".join(json.dumps(r) + "\n" for r in records))
