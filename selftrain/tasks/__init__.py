"""Evaluation tasks as data: a YAML description plus JSONL rows (or a generator), after
lm-evaluation-harness. Field names follow lm-eval (``doc_to_text``, ``doc_to_choice``,
``doc_to_target``, ``target_delimiter``, ``fewshot_delimiter``) and templates are Jinja, so a
task exports to lm-eval unchanged (see ``selftrain.evaluation.lm_eval_export``).

Built-in tasks live in ``selftrain/tasks/builtin/<name>.yaml``; any other YAML path works too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from selftrain.config import MAX_YAML_BYTES, safe_yaml
from selftrain.errors import SelftrainError

BUILTIN_DIR = Path(__file__).parent / "builtin"
_jinja = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


class GenerationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(16, ge=1, description="Tokens generated per answer.")
    until: list[str] = Field(default_factory=lambda: ["\n\n"], description="Stop strings.")


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str | None = Field(None, description="JSONL file (relative to the YAML) or hf:<id>[:config].")
    split: str = Field("test", description="Split, for hf: datasets.")
    generator: str | None = Field(None, description="A built-in generator (arithmetic, bbc_news, cloze).")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the generator.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.generator is None):
            raise ValueError("give exactly one of data.path or data.generator")
        return self


class TaskSpec(BaseModel):
    """One evaluation task. Every field has the meaning it has in lm-evaluation-harness."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., description="Task name, used in metric names: <name>_<k>shot_acc.")
    description: str = Field("", description="Instruction placed before the demonstrations.")
    output_type: Literal["multiple_choice", "generate"] = Field(
        ..., description="multiple_choice: log-likelihood of each choice; generate: greedy answer, matched.")
    data: DataSpec = Field(..., description="Where the rows come from.")
    fewshot_data: DataSpec | None = Field(None, description="Demonstration rows; default: the task's own rows.")
    doc_to_text: str = Field(..., description="Jinja template of the prompt, e.g. 'Q: {{question}}\\nA:'.")
    doc_to_target: str = Field(..., description="Field or Jinja template of the gold answer (index or text).")
    doc_to_choice: list[str] | str | None = Field(
        None, description="multiple_choice: a fixed list of choices, or the field holding each row's list.")
    input_field: str | None = Field(None, description="The row field holding free input text (for Self-ICL).")
    target_delimiter: str = Field(" ", description="Between the prompt and the answer.")
    fewshot_delimiter: str = Field("\n\n", description="Between demonstrations.")
    match: Literal["exact", "numeric", "final_number", "regex"] = Field(
        "exact", description="generate: how answers match (numeric: the first number; final_number: the last).")
    regex: str | None = Field(None, description="match=regex: pattern whose first group is the answer.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="generate: decoding.")
    source_dir: Path | None = Field(None, exclude=True, description="Folder of the YAML (for relative paths).")

    @model_validator(mode="after")
    def _consistent(self):
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            raise ValueError("multiple_choice tasks need doc_to_choice")
        if isinstance(self.doc_to_choice, list) and len(self.doc_to_choice) < 2:
            raise ValueError(f"doc_to_choice has {len(self.doc_to_choice)} choice(s); a label set needs at least 2")
        if self.match == "regex" and not self.regex:
            raise ValueError("match=regex needs a regex")
        return self

    # ------------------------------------------------------------------ rendering
    def render(self, template: str, doc: dict) -> str:
        try:
            return _jinja.from_string(template).render(**doc)
        except TemplateError as e:
            raise SelftrainError(f"task {self.name}: template {template!r} fails on a row with fields "
                                 f"{sorted(doc)}: {e}") from None

    def text(self, doc: dict) -> str:
        return self.render(self.doc_to_text, doc)

    def choices(self, doc: dict) -> list[str]:
        if isinstance(self.doc_to_choice, list):
            return list(self.doc_to_choice)
        value = doc.get(self.doc_to_choice) if self.doc_to_choice else None
        if not isinstance(value, list) or len(value) < 2:
            raise SelftrainError(f"task {self.name}: field {self.doc_to_choice!r} must hold a list of at least "
                                 f"2 choices; a row has {value!r}")
        return [str(c) for c in value]

    def target(self, doc: dict) -> str | int:
        """The gold answer: a choice index for multiple_choice, a string for generate."""
        raw = doc[self.doc_to_target] if self.doc_to_target in doc else self.render(self.doc_to_target, doc)
        if self.output_type == "generate":
            return str(raw)
        choices = self.choices(doc)
        if isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit() and raw not in choices):
            index = int(raw)
            if not 0 <= index < len(choices):
                raise SelftrainError(f"task {self.name}: target index {index} is outside {len(choices)} choices")
            return index
        if raw not in choices:
            raise SelftrainError(f"task {self.name}: target {raw!r} is not one of the choices {choices}")
        return choices.index(raw)

    def target_text(self, doc: dict) -> str:
        gold = self.target(doc)
        return self.choices(doc)[gold] if isinstance(gold, int) else gold

    # ------------------------------------------------------------------ rows
    def docs(self, texts: list[str] | None = None) -> list[dict]:
        return self._load(self.data, texts)

    def fewshot_docs(self, texts: list[str] | None = None) -> list[dict] | None:
        return None if self.fewshot_data is None else self._load(self.fewshot_data, texts)

    def _load(self, spec: DataSpec, texts: list[str] | None) -> list[dict]:
        if spec.generator:
            from selftrain.tasks.generators import GENERATORS

            if spec.generator not in GENERATORS:
                raise SelftrainError(f"task {self.name}: unknown generator {spec.generator!r}; "
                                     f"known: {', '.join(sorted(GENERATORS))}")
            rows = GENERATORS[spec.generator](texts=texts, **spec.args)
        else:
            rows = _read_rows(spec, self.source_dir, self.name)
        if not rows:
            raise SelftrainError(f"task {self.name}: no rows in {spec.path or spec.generator}")
        self._check_rows(rows)
        return rows

    def _check_rows(self, rows: list[dict]) -> None:
        """Render the first 50 rows fully so a missing field fails here, with the row's number."""
        for i, doc in enumerate(rows[:50]):
            try:
                self.text(doc)
                if self.output_type == "multiple_choice":
                    self.choices(doc)
                self.target(doc)
            except (SelftrainError, KeyError) as e:
                raise SelftrainError(f"task {self.name}, row {i + 1}: {e}") from None


def _read_rows(spec: DataSpec, base: Path | None, name: str) -> list[dict]:
    if spec.path.startswith("hf:"):
        import datasets

        ident, _, cfg = spec.path[3:].partition(":")
        try:
            return list(datasets.load_dataset(ident, cfg or None, split=spec.split))
        except Exception as e:  # offline, missing, or private
            raise SelftrainError(f"task {name}: cannot load {spec.path} ({type(e).__name__}: {e})") from None
    path = Path(spec.path)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise SelftrainError(f"task {name}: data file {path} not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SelftrainError(f"task {name}: {path} is not UTF-8 text (byte {e.start}); convert it") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SelftrainError(f"task {name}: {path}:{n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SelftrainError(f"task {name}: {path}:{n} is not a JSON object")
            rows.append(row)
    return rows


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_task(ref: str | Path) -> TaskSpec:
    """A built-in task name (``arith``, ``bbc-topics``, ``cloze``) or a path to a task YAML."""
    ref = str(ref)
    name = ref.removeprefix("builtin:")
    path = BUILTIN_DIR / f"{name}.yaml" if name in builtin_tasks() else Path(ref)
    if not path.is_file():
        raise SelftrainError(f"unknown task {ref!r}: not a file, and the built-in tasks are "
                             f"{', '.join(builtin_tasks())}")
    if path.stat().st_size > MAX_YAML_BYTES:  # refused before it is read
        raise SelftrainError(f"task file {path} is {path.stat().st_size:,} bytes; the limit is {MAX_YAML_BYTES:,}")
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8"), "the task file")
    except yaml.YAMLError as e:
        raise SelftrainError(f"task file {path} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise SelftrainError(f"task file {path} is not UTF-8 text (byte {e.start}); convert it") from None
    if not isinstance(raw, dict):
        raise SelftrainError(f"task file {path} must be a mapping of fields")
    try:
        return TaskSpec(**raw, source_dir=path.parent)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'task'}: {err['msg']}" for err in e.errors())
        raise SelftrainError(f"task file {path}: {problems}") from None


def sample_demos(pool: list[dict], k: int, exclude_text: str, task: TaskSpec, rng: random.Random) -> list[dict]:
    """k demonstrations drawn from ``pool`` with ``rng``, never one whose prompt is the evaluated one."""
    demos: list[dict] = []
    if k == 0:
        return demos
    for i in rng.sample(range(len(pool)), len(pool)):
        if task.text(pool[i]) != exclude_text:
            demos.append(pool[i])
            if len(demos) == k:
                return demos
    raise SelftrainError(f"task {task.name}: {k}-shot needs {k} demonstrations besides the evaluated row; "
                         f"only {len(demos)} available")
