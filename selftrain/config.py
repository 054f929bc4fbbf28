"""The schema of a run: YAML in (safely), validated by pydantic, clear errors out.

A config has the sections ``run``, ``model``, ``data``, ``guard``, ``eval``, ``sandbox``,
``rounds``, ``stop`` and ``stages``; a typo anywhere names the key, where it is, and the keys that are
valid. Each stage entry is ``{name: {its options}}``, validated by that stage's own ``Config``
in ``selftrain.stages`` (this module knows no stage).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selftrain.errors import SelftrainError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field("run", description="Run name; the run directory defaults to runs/<name>.")
    output_dir: str | None = Field(None, description="Run directory (default: runs/<name>).")
    seed: int = Field(0, description="Seed for data split, initialisation, sampling and training.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train and evaluate.")
    keep_rejected_checkpoints: bool = Field(
        False, description="Keep the weights of stages the guard rolled back (for debugging)."
    )
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="Experiment tracker every trainer logs to (tensorboard: offline, in stages/<key>/tracking).")

    @field_validator("name")
    @classmethod
    def _simple_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("run.name must be letters, digits, '.', '_' or '-' (no path separators)")
        return v


class ModelConfig(Section):
    preset: Literal["tiny", "tiny-bert", "smollm2-135m"] | None = Field(
        None, description="A built-in model: tiny (Llama, from scratch), tiny-bert (encoder), smollm2-135m."
    )
    pretrained: str | None = Field(None, description="Hub id or local directory of a Hugging Face model.")
    gguf_file: str | None = Field(None, description="GGUF file inside `pretrained` to load (dequantised).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `pretrained`.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Off unless you trust it.")
    architecture: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the preset's architecture (hidden_size, ...)."
    )
    vocab_size: int = Field(
        4096, ge=300, description="Vocabulary of the BPE tokenizer trained on the corpus for a new model."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.preset is None) == (self.pretrained is None):
            raise ValueError("set exactly one of model.preset or model.pretrained")
        return self


class DataConfig(Section):
    train: str | list[str] = Field(
        "builtin:pydocs",
        description="Sources: file/folder (.txt .md .jsonl .csv .parquet), hf:<dataset id>, builtin:pydocs.",
    )
    heldout: str | list[str] | None = Field(
        None, description="Separate held-out sources; default: a fraction of `train`."
    )
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5, description="Share of documents held out.")
    text_column: str = Field("text", description="Column holding the text in JSONL/CSV/Parquet/HF data.")
    hf_split: str = Field("train", description="Split to load from a Hugging Face dataset.")
    max_documents: int | None = Field(None, ge=2, description="Keep at most this many documents.")
    min_chars: int = Field(20, ge=1, description="Drop documents shorter than this many characters.")
    paragraphs: bool = Field(True, description="Split text files into paragraphs (blank-line separated).")


class GuardConfig(Section):
    metric: str = Field("heldout_ppl", description="The primary metric: it judges a stage with no target of its own, "
                        "is protected, and its plateau ends rounds: auto.")
    mode: Literal["auto", "min", "max"] = Field(
        "auto", description="Whether lower or higher is better; auto knows the built-in metrics."
    )
    tolerance: float = Field(0.02, ge=0, description="Relative regression of a protected metric still accepted "
                             "from a stage that names no target of its own.")
    min_target_gain: float = Field(0.0, ge=0, description="How much a stage's target must rise (absolute, in the "
                                   "metric's units) to count as raised.")
    protect: list[str] = Field(
        default_factory=list, description="More metrics a stage must not harm, beside `metric` (e.g. an earlier "
        "task's accuracy).")
    forgetting_budget: float = Field(0.15, ge=0, description="Relative regression of a protected metric accepted "
                                     "from a stage that raised its target.")
    drift_budget: float | None = Field(
        0.2, ge=0, description="Relative regression of a protected metric from its best value in the run (start "
        "included) beyond which no stage is accepted: per-stage regressions add up; null: no budget.")
    max_synthetic_fraction: float = Field(
        0.5, ge=0, le=1, description="Cap on synthetic examples as a share of the whole pool (the excess is dropped)."
    )
    scrub: list[Literal["email", "phone", "key"]] = Field(
        default_factory=lambda: ["email", "phone", "key"], description="Replaced in synthetic text before it enters "
        "the pool: e-mail addresses, phone numbers, key-like strings ([] keeps text as the model wrote it).")
    min_distinct_2: float | None = Field(
        0.05, description="Collapse detector: roll back if the samples' distinct-2 falls below this."
    )
    min_entropy: float | None = Field(
        0.05, description="Collapse detector: roll back if mean next-token entropy (nats) falls below this."
    )
    max_self_bleu: float | None = Field(
        0.9, description="Collapse detector: roll back if the samples' self-BLEU (copies of each other) exceeds this."
    )
    max_heldout_ppl: float | None = Field(
        None, gt=0, description="Collapse detector: roll back if held-out perplexity exceeds this ceiling."
    )

    def protected(self) -> list[str]:
        return list(dict.fromkeys([self.metric, *self.protect]))


class StopConfig(Section):
    max_rounds: int = Field(10, ge=1, description="rounds: auto runs at most this many rounds.")
    patience: int | None = Field(
        None, ge=1, description="Stop after this many rounds in a row in which guard.metric gained less than "
        "min_delta (default: 1 with rounds: auto, never with a fixed number).")
    min_delta: float = Field(0.01, ge=0, description="Relative gain of guard.metric over a round that counts as "
                             "progress.")
    when_nothing_accepted: bool | None = Field(
        None, description="Stop when a round accepts no stage (default: yes with rounds: auto, no with a number).")
    max_minutes: float | None = Field(None, gt=0, description="Budget of the whole run: no stage starts after this "
                                      "many minutes of stages and evaluations.")
    round_max_minutes: float | None = Field(None, gt=0, description="Budget of one round: its later stages are "
                                            "skipped once it has spent this many minutes.")
    max_steps: int | None = Field(None, ge=1, description="Budget of the whole run in optimizer steps (as the "
                                  "trainers log them): no stage starts once spent.")
    round_max_steps: int | None = Field(None, ge=1, description="Budget of one round in optimizer steps.")


class TaskEval(Section):
    task: str = Field(..., description="Built-in task (arith, arith-chat, bbc-topics, cloze) or a task YAML path.")
    shots: list[int] = Field([0], description="Numbers of demonstrations to evaluate with.")
    limit: int | None = Field(200, ge=1, description="Items scored (the first N rows); null for all.")
    chat: bool | Literal["auto"] = Field(False, description="Wrap prompts in the tokenizer's chat template.")

    @field_validator("shots")
    @classmethod
    def _shots(cls, v):
        if not v or any(k < 0 for k in v):
            raise ValueError("shots must be a non-empty list of numbers >= 0")
        return v


class EvalConfig(Section):
    max_tokens: int = Field(32768, ge=2, description="Held-out tokens scored for perplexity.")
    max_documents: int = Field(20000, ge=1, description="Held-out documents read for evaluation (an evenly "
                               "spaced subset of a larger held-out side, which stays whole on disk).")
    block_size: int | None = Field(
        None, ge=2, description="Scoring window; default min(model context, 256)."
    )
    batch_size: int = Field(8, ge=1, description="Blocks per forward pass when scoring.")
    samples: int = Field(16, ge=0, description="Samples generated for diversity (0 skips them).")
    prompt_tokens: int = Field(8, ge=1, description="Held-out prefix length that prompts each sample.")
    max_new_tokens: int = Field(40, ge=1, description="Length of each diversity sample.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for diversity samples.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass for diversity samples.")
    tasks: list[TaskEval] = Field(
        default_factory=list, description="Zero/few-shot tasks scored after every stage (metrics <task>_<k>shot_acc).")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_shorthand(cls, v):
        return [{"task": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v


class SandboxSection(Section):
    min_isolation: Literal["full", "namespaces", "none"] = Field(
        "full", description="Least isolation model-written code may run under: full (namespaces, user 65534, "
        "seccomp), namespaces (no seccomp) or none (rlimits and an audit hook only); stages refuse to start below.")


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection, description="Name, directory, seed, device.")
    model: ModelConfig = Field(..., description="The model to improve.")
    data: DataConfig = Field(default_factory=DataConfig, description="Unlabelled text and its split.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Accept / roll back rule.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation after every stage.")
    sandbox: SandboxSection = Field(default_factory=SandboxSection, description="Where model-written code runs.")
    rounds: int | Literal["auto"] = Field(
        1, description="How many times the stage list runs; auto: until a stop condition (see stop) holds.")
    stop: StopConfig = Field(default_factory=StopConfig, description="When rounds end early: plateau, nothing "
                             "accepted, budgets.")
    stages: list[str | dict[str, Any]] = Field(..., min_length=1, description="Stages, in order.")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.run.name}")

    def fingerprint(self) -> str:
        """Hash of the whole config as manifests before version 2 stored it (see run_fingerprints):
        the sections of that version only, so their runs still resume."""
        return _hash(self.model_dump(mode="json", exclude={"sandbox": True, "stop": True, "run": {"report_to"},
                                                          "eval": {"max_documents"}, "guard": set(GUARD_ADDED)}))

    def run_fingerprints(self) -> dict[str, str]:
        """One hash per run-level section: what shapes every finished stage's results (model, data,
        seed, evaluation, guard, and any section added later). A resume must match them all.
        Stages are fingerprinted one by one (stage_fingerprint); rounds only add stages."""
        # options left at their defaults are not hashed: an option a later version adds leaves runs resumable
        dump = self.model_dump(mode="json", exclude={"rounds", "stop", "stages", "sandbox"}, exclude_defaults=True)
        dump.setdefault("run", {})
        dump["run.seed"] = dump.pop("run").get("seed", 0)  # name, directory, device don't change results
        return {k: _hash(v) for k, v in dump.items()}


# guard options added later (targets, budgets, more detectors): not in the version-1 hash
GUARD_ADDED = ("min_target_gain", "protect", "forgetting_budget", "drift_budget", "max_self_bleu",
               "max_heldout_ppl", "scrub")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- loading


MAX_YAML_BYTES = 1_000_000
MAX_YAML_NODES = 100_000  # counted with every alias expanded: a "billion laughs" file is refused, not expanded


def safe_yaml(text: str, what: str):
    """``yaml.safe_load`` that refuses what would exhaust memory or the stack downstream: a file over
    1 MB, aliases that expand past 100,000 nodes, a structure that refers to itself, deep nesting.
    Raises yaml.YAMLError (with ``what`` named) for each."""
    if len(text) > MAX_YAML_BYTES:
        raise yaml.YAMLError(f"{what} is {len(text):,} characters; the limit is {MAX_YAML_BYTES:,}")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(node, {}, set(), what)
        return loader.construct_document(node)
    except RecursionError:
        raise yaml.YAMLError(f"{what} is nested too deeply") from None
    finally:
        loader.dispose()


def _count_nodes(node, sizes: dict, open_: set, what: str) -> int:
    """Nodes under ``node`` with aliases expanded (memoised, so a bomb is measured, not walked)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise yaml.YAMLError(f"{what} refers to itself (a recursive alias)")
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else [
        n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    size = 1 + sum(_count_nodes(c, sizes, open_, what) for c in children)
    open_.discard(id(node))
    if size > MAX_YAML_NODES:
        raise yaml.YAMLError(f"{what} expands to more than {MAX_YAML_NODES:,} values (aliases counted each time "
                             "they are used)")
    sizes[id(node)] = size
    return size


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML safely, apply ``key.path=value`` overrides, validate. Raises SelftrainError."""
    path = Path(path)
    if not path.is_file():
        raise SelftrainError(f"config file not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:  # refused before it is read
        raise SelftrainError(f"{path} is {path.stat().st_size:,} bytes; a config is at most {MAX_YAML_BYTES:,}")
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8"), "the config")
    except yaml.YAMLError as e:
        raise SelftrainError(f"malformed YAML in {path}: {e}") from None
    except UnicodeDecodeError:
        raise SelftrainError(f"config file is not UTF-8 text: {path}") from None
    if not isinstance(raw, dict):
        raise SelftrainError(f"{path}: a config is a YAML mapping (run:, model:, data:, stages: ...)")
    return config_from_dict(raw, overrides, source=str(path))


def config_from_dict(raw: dict, overrides=(), source: str = "config") -> RunConfig:
    raw = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)
    try:
        cfg = RunConfig(**raw)
    except ValidationError as e:
        raise SelftrainError(f"{source}: " + format_validation_error(e, RunConfig, "")) from None
    except TypeError as e:  # e.g. a section given as a list instead of a mapping
        raise SelftrainError(f"{source}: {e}") from None
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``--set a.b.c=value``; the value is parsed as YAML (numbers, lists, booleans).

    ``stages.0.pretrain.max_steps=5`` addresses one stage; ``stages.pretrain.max_steps=5``
    every stage of that name.
    """
    if "=" not in item:
        raise SelftrainError(f"--set expects key.path=value, got {item!r}")
    key, _, text = item.partition("=")
    try:
        value = safe_yaml(text, "the --set value")
    except yaml.YAMLError:
        value = text
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise SelftrainError(f"--set has an empty key: {item!r}")
    if parts[0] == "stages" and len(parts) > 2 and isinstance(raw.get("stages"), list):
        # a bare `- pretrain` entry takes options like `- pretrain: {...}`
        raw["stages"] = [{s: {}} if isinstance(s, str) else s for s in raw["stages"]]
    if parts[0] == "stages" and len(parts) > 2 and not parts[1].isdigit():
        targets = [s for s in raw.get("stages", []) if isinstance(s, dict) and parts[1] in s]
        if not targets:
            raise SelftrainError(f"--set {key}: no stage named {parts[1]!r} in this config")
        for stage in targets:
            if stage[parts[1]] is None:
                stage[parts[1]] = {}
            _set_path(stage[parts[1]], parts[2:], value, key)
        return
    _set_path(raw, parts, value, key)


def _set_path(node: Any, parts: list[str], value: Any, key: str) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SelftrainError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise SelftrainError(f"--set {key}: cannot set inside a {type(node).__name__}")


# ---------------------------------------------------------------------------- messages


def unknown_name(key: str, valid, what: str = "key", listing: str | None = None) -> str:
    """The message for a name that is not valid, with the closest valid one (``unknown key
    'lerning_rate'. Did you mean 'learning_rate'? Valid keys: ...``); ``listing`` replaces a list
    too long to print."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {key!r}.{hint} Valid {what}s: {listing or ', '.join(valid)}"


def _unknown_key_message(where: str, key: str, valid: list[str]) -> str:
    return f"config error at {where}: {unknown_name(key, valid)}"


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by walking field names in ``loc`` from ``cls``."""
    for part in loc:
        if not isinstance(part, str) or part not in cls.model_fields:
            continue
        ann = cls.model_fields[part].annotation
        candidates = get_args(ann) if get_origin(ann) is not None else (ann,)
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        cls = nested[0]
    return cls


def format_validation_error(err: ValidationError, cls: type[BaseModel], prefix: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(cls, loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            lines.append(_unknown_key_message(where, str(loc[-1]), valid))
        elif e["type"] == "missing":
            lines.append(f"config error at {where}: required key is missing")
        elif e["type"] == "value_error":  # our validators' messages name the key and what is valid
            lines.append(f"config error at {where}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"config error at {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)
