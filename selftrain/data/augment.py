"""Text augmentation operations that need no model: EDA (Wei & Zou 2019), sentence reordering,
clause inversion and keyboard typos.

Every operation takes one text and a row of uniform random numbers and returns the variant, or
None when it cannot change that text (a single word cannot be swapped; a word list with no known
synonym cannot be rewritten). The numbers come from ``uniforms``: counter-based (a splitmix64
hash of the seed, the text and the draw index, vectorised in numpy), so a text gets the same
variant whatever batch, process or pool position it is in, and ``datasets.map`` over any number
of processes gives the same output as one loop.

Words are the whitespace-separated tokens of a text, punctuation attached ("barked." is one
word); the whitespace between them is kept, so a paragraph keeps its line breaks. A word's *core*
is the word without leading and trailing punctuation; synonyms replace the core only, keeping
its capitalisation and its punctuation. Operations:

- ``synonym``: replace n = max(1, round(alpha x words)) distinct words that have a synonym and are
  not stop words, each by a synonym drawn at random;
- ``insert``: n times, insert a synonym of a random such word at a random position;
- ``swap``: n times, swap two random words;
- ``delete``: drop each word with probability alpha, never all of them;
- ``reorder``: shuffle the sentences (a text of two or more sentences);
- ``invert``: move a subordinate clause to the other side ("The dog barked when the bell rang."
  <-> "When the bell rang, the dog barked.");
- ``typo``: replace each letter with probability alpha / 4 by a neighbour on a QWERTY keyboard.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from itertools import compress

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

SynonymTable = dict[str, tuple[str, ...]]  # lower-case word -> its synonyms (lower-case, single words)

EDA_OPS = ("synonym", "insert", "swap", "delete")
TEXT_OPS = (*EDA_OPS, "reorder", "invert", "typo")
NEEDS_SYNONYMS = ("synonym", "insert")

_SPACE = re.compile(r"(\s+)")
_PUNCT = "\"'`([{<.,;:!?)]}>\u2018\u2019\u201c\u201d\u2026-"
_ALPHA_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")

# ----------------------------------------------------------------------------- random numbers

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective hash of 64-bit integers whose outputs look uniform."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_keys(texts: Sequence[str], seed: int, stream: int = 0) -> np.ndarray:
    """One 64-bit key per text from the seed, the text's CRC-32 and a stream number (the op and the
    variant index), so two ops or two variants of the same text draw different numbers."""
    crc = np.fromiter((zlib.crc32(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.uint64,
                      count=len(texts))
    with np.errstate(over="ignore"):
        base = _splitmix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(stream))
        return _splitmix(crc ^ base)


def uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """``[len(keys), n]`` floats in [0, 1): draw j of row i depends only on keys[i] and j."""
    with np.errstate(over="ignore"):
        counters = keys[:, None] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        return (_splitmix(counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- words and layout


Layout = tuple[str, list[str], str]  # (leading whitespace, the whitespace between words, trailing)


def split_words(text: str) -> tuple[list[str], Layout | None]:
    """(words, layout): layout is None when every gap is one space (the common case, rejoined with
    ``" ".join``), else the text's own whitespace, so a paragraph keeps its line breaks."""
    words = text.split()
    if text.isprintable() and text.count(" ") == len(words) - 1:  # no other whitespace: one space per gap
        return words, None
    parts = _SPACE.split(text)
    lead = trail = ""
    if parts[0] == "":
        lead, parts = (parts[1], parts[2:]) if len(parts) > 1 else ("", [])
    if len(parts) > 1 and parts[-1] == "":
        trail, parts = parts[-2], parts[:-2]
    return parts[0::2], (lead, parts[1::2], trail)


def join_words(words: list[str], layout: Layout | None) -> str:
    if layout is None:
        return " ".join(words)
    lead, gaps, trail = layout
    out = [lead]
    for i, w in enumerate(words):
        if i:
            out.append(gaps[i - 1] if i - 1 < len(gaps) else " ")
        out.append(w)
    out.append(trail)
    return "".join(out)


def core_of(word: str) -> tuple[str, str, str]:
    """(leading punctuation, core, trailing punctuation) of a word."""
    core = word.strip(_PUNCT)
    if not core:
        return word, "", ""
    start = word.find(core)
    return word[:start], core, word[start + len(core):]


def match_case(replacement: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return replacement.upper()
    if like[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def count_for(alpha: float, n_words: int) -> int:
    """How many words an operation of strength alpha changes: at least one."""
    return int(alpha * n_words + 0.5) or 1


# ----------------------------------------------------------------------------- the operations


def replaceable(words: list[str], synonyms: SynonymTable) -> list[int]:
    """Positions of words whose core has a synonym and is not a stop word."""
    out = []
    for i, w in enumerate(words):
        core = w.strip(_PUNCT).lower()
        if core in synonyms and core not in ENGLISH_STOP_WORDS:
            out.append(i)
    return out


def synonym_replace(words: list[str], layout: Layout | None, u: list[float], alpha: float,
                    synonyms: SynonymTable) -> str | None:
    """Draws: one per word, then one per replaced word."""
    candidates = replaceable(words, synonyms)
    if not candidates:
        return None
    n = min(len(candidates), count_for(alpha, len(words)))
    chosen = sorted(candidates, key=u.__getitem__)[:n]
    for k, i in enumerate(chosen):
        lead, core, trail = core_of(words[i])
        options = synonyms[core.lower()]
        words[i] = lead + match_case(options[int(u[len(words) + k] * len(options))], core) + trail
    return join_words(words, layout)


def random_insert(words: list[str], layout: Layout | None, u: list[float], alpha: float,
                  synonyms: SynonymTable) -> str | None:
    """Draws: three per inserted word (which word's synonym, which synonym, where)."""
    candidates = replaceable(words, synonyms)
    if not candidates:
        return None
    for k in range(count_for(alpha, len(words))):
        source = candidates[int(u[3 * k] * len(candidates))]
        options = synonyms[words[source].strip(_PUNCT).lower()]
        at = int(u[3 * k + 2] * (len(words) + 1))
        words.insert(at, options[int(u[3 * k + 1] * len(options))])
        if layout is not None:  # the inserted word gets one space beside it
            layout[1].insert(min(at, len(layout[1])), " ")
        candidates = [c + (c >= at) for c in candidates]
    return join_words(words, layout)


def random_swap(words: list[str], layout: Layout | None, pairs: list[tuple[int, int]]) -> str | None:
    """Swap each pair of positions in turn (pairs of distinct positions; see ``swap_pairs``)."""
    if len(words) < 2:
        return None
    before = list(words) if len(pairs) > 1 else None  # two swaps can undo each other
    for i, j in pairs:
        words[i], words[j] = words[j], words[i]
    if before is not None and words == before:
        i, j = pairs[0]
        words[i], words[j] = words[j], words[i]
    return " ".join(words) if layout is None else join_words(words, layout)


def swap_pairs(u: np.ndarray, n_words: np.ndarray, alpha: float) -> list[list[tuple[int, int]]]:
    """Vectorised positions for ``random_swap``: two draws per swap become two distinct positions."""
    m = n_words[:, None].astype(np.int64)
    i = (u[:, 0::2] * m).astype(np.int64)
    j = (u[:, 1::2] * np.maximum(m - 1, 1)).astype(np.int64)
    j += j >= i
    counts = np.maximum(1, (alpha * n_words + 0.5).astype(np.int64))
    return [list(zip(a[:c], b[:c])) for a, b, c in zip(i.tolist(), j.tolist(), counts.tolist())]


def random_delete(words: list[str], layout: Layout | None, keep: list[bool], spare: float) -> str | None:
    """Drop the words whose ``keep`` is False (each False with probability alpha: ``u >= alpha``).
    Never empty: when every word fell, the one at ``spare`` stays; when none fell, the one at
    ``spare`` goes, so the variant differs."""
    m = len(words)
    if m < 2:
        return None
    if layout is None:
        kept = list(compress(words, keep))
        if 0 < len(kept) < m:
            return " ".join(kept)
    index = [i for i in range(m) if keep[i]]
    if not index:
        index = [int(spare * m)]
    elif len(index) == m:
        index.remove(int(spare * m))
    if layout is None:
        return " ".join([words[i] for i in index])
    lead, gaps, trail = layout
    # between two kept words, the gap that held the most line breaks (a deleted word's break survives)
    kept_gaps = [max(gaps[a:b], key=lambda g: g.count("\n")) for a, b in zip(index, index[1:])]
    return join_words([words[i] for i in index], (lead, kept_gaps, trail))


# a sentence ends at . ! ? (and any closing quotes or brackets, which stay with it); the next one
# starts after whitespace with a capital, a digit or an opening quote
_BOUNDARY = re.compile(r"(?<=[.!?])([\"')\]]*)(\s+)(?=[\"'(\[]*[A-Z0-9])")
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "vs", "etc", "e.g", "i.e", "cf", "no", "fig", "jr", "sr",
                 "inc", "ltd", "co", "u.s", "u.k", "approx", "dept", "est", "vol"}


def split_sentences(text: str) -> list[str]:
    """The sentences of a text (see ``sentence_layout``)."""
    return sentence_layout(text)[0]


def sentence_layout(text: str) -> tuple[list[str], list[str]]:
    """(sentences, separators): ``text == seps[0] + s0 + seps[1] + s1 + ... + seps[-1]``, so putting
    sentences back into the separators keeps every line break and indent. A period after an
    abbreviation (Mr., e.g., U.S.) or an initial ("J. Smith") does not end a sentence."""
    pieces, seps, last = [], [text[:len(text) - len(text.lstrip())]], len(text) - len(text.lstrip())
    core_end = len(text.rstrip())
    for m in _BOUNDARY.finditer(text, last, core_end):
        before = text[last:m.start(1)].rsplit(None, 1)[-1].rstrip(".!?").lower() if text[last:m.start(1)].strip() else ""
        if before in ABBREVIATIONS or (len(before) == 1 and before.isalpha()):
            continue
        pieces.append(text[last:m.end(1)])
        seps.append(m.group(2))
        last = m.end(2)
    if last < core_end or not pieces:
        pieces.append(text[last:core_end])
    seps.append(text[core_end:])
    return pieces, seps


def _rebuild(sentences: list[str], seps: list[str]) -> str:
    return seps[0] + "".join(s + sep for s, sep in zip(sentences, seps[1:]))


def reorder_sentences(text: str, u: list[float]) -> str | None:
    """Shuffle the sentences into the text's own separators (line breaks stay where they were).
    Draws: one per sentence."""
    sentences, seps = sentence_layout(text)
    if len(sentences) < 2:
        return None
    order = sorted(range(len(sentences)), key=u.__getitem__)
    if [sentences[i] for i in order] == sentences:  # no change: a rotation by one differs unless all are equal
        order = list(range(1, len(sentences))) + [0]
    return _rebuild([sentences[i] for i in order], seps)


# Clause inversion is kept conservative: a wrong inversion garbles text, a missed one costs nothing.
# Both clauses must start with a subject (a determiner or pronoun, so lower-casing it is safe and an
# imperative such as "Return True if ..." is left alone), hold at least two words, and carry no
# quotes, brackets, line breaks or further commas. "if" and "once" only lead ("I wonder if it rains"
# is not a condition; "only once" is an adverb), so they are never moved to the front.
SUBJECT_STARTS = {"the", "a", "an", "this", "that", "these", "those", "it", "he", "she", "we", "they", "i",
                  "you", "there", "my", "our", "his", "her", "their", "its", "your", "each", "every", "no",
                  "some", "all", "one"}
LEADING_CONJUNCTIONS = ("when", "because", "if", "while", "although", "though", "after", "before", "since",
                        "until", "unless", "whenever", "once")
TRAILING_CONJUNCTIONS = tuple(c for c in LEADING_CONJUNCTIONS if c not in ("if", "once"))
_CLAUSE = r"[^,;:\"'()\[\]\n]+?"
_TRAILING = re.compile(rf"^(?P<main>{_CLAUSE}) (?P<conj>{'|'.join(TRAILING_CONJUNCTIONS)}) (?P<sub>{_CLAUSE})(?P<end>[.!?])$")
_LEADING = re.compile(rf"^(?P<conj>{'|'.join(c.capitalize() for c in LEADING_CONJUNCTIONS)}) (?P<sub>{_CLAUSE}), "
                      rf"(?P<main>{_CLAUSE})(?P<end>[.!?])$")


def _is_clause(phrase: str) -> bool:
    words = phrase.split()
    return len(words) >= 2 and words[0].lower() in SUBJECT_STARTS


def _lower_first(phrase: str) -> str:
    return phrase if phrase.startswith("I ") else phrase[:1].lower() + phrase[1:]


def invert_sentence(sentence: str) -> str | None:
    """"Main conj sub." <-> "Conj sub, main." for a sentence that safely allows it, else None."""
    m = _LEADING.match(sentence)
    if m and _is_clause(m["main"]) and _is_clause(m["sub"]):
        return f"{m['main'][:1].upper()}{m['main'][1:]} {m['conj'].lower()} {m['sub']}{m['end']}"
    m = _TRAILING.match(sentence)
    if m and m["main"][:1].isupper() and _is_clause(m["main"]) and _is_clause(m["sub"]):
        return f"{m['conj'].capitalize()} {m['sub']}, {_lower_first(m['main'])}{m['end']}"
    return None


def invert_clauses(text: str, u: list[float]) -> str | None:
    """Invert one sentence that allows it (the one with the smallest draw), in place. Draws: one
    per sentence."""
    sentences, seps = sentence_layout(text)
    inverted = [(u[i], i, invert_sentence(s)) for i, s in enumerate(sentences)]
    inverted = [x for x in inverted if x[2] is not None]
    if not inverted:
        return None
    _, i, new = min(inverted)
    sentences[i] = new
    return _rebuild(sentences, seps)


_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
KEYBOARD: dict[str, str] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _key in enumerate(_row):
        near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
        near += [_ROWS[rr][j] for rr in (_r - 1, _r + 1) if 0 <= rr < 3 for j in (_c - 1, _c, _c + 1)
                 if 0 <= j < len(_ROWS[rr])]
        KEYBOARD[_key] = "".join(near)


def keyboard_typos(text: str, u: list[float], alpha: float) -> str | None:
    """Each ASCII letter, with probability alpha / 4, becomes a keyboard neighbour (case kept).
    Draws: one per letter, one per typo, one spare."""
    p = alpha / 4
    chars = list(text)
    letters = [i for i, ch in enumerate(chars) if ch.isascii() and ch.lower() in KEYBOARD]
    if not letters:
        return None
    n = len(letters)
    hits = [i for k, i in enumerate(letters) if u[k] < p] or [letters[int(u[n] * n)]]  # at least one typo
    for k, i in enumerate(hits):
        near = KEYBOARD[chars[i].lower()]
        new = near[int(u[n + 1 + k] * len(near))]
        chars[i] = new.upper() if chars[i].isupper() else new
    return "".join(chars)


# ----------------------------------------------------------------------------- batches

OP_STREAM = {op: i + 1 for i, op in enumerate(TEXT_OPS)}
_MATRIX_WIDTH = 512  # rows needing more draws (long paragraphs) get their own, so a batch stays small


def draws_needed(op: str, n_words: np.ndarray, texts: Sequence[str], alpha: float) -> np.ndarray:
    """Random numbers ``op`` may use on each text (see each operation's docstring)."""
    count = np.maximum(1, (alpha * n_words + 0.5).astype(np.int64))
    if op == "synonym":
        return n_words + count
    if op == "swap":
        return 2 * count
    if op == "delete":
        return n_words + 1
    if op == "insert":
        return 3 * count
    if op == "typo":
        return np.fromiter((2 * len(t) + 2 for t in texts), dtype=np.int64, count=len(texts))
    return np.fromiter((t.count(".") + t.count("!") + t.count("?") + 2 for t in texts), dtype=np.int64,
                       count=len(texts))  # one per sentence


def apply_op(op: str, texts: Sequence[str], *, seed: int, variant: int = 0, alpha: float = 0.1,
             synonyms: SynonymTable | None = None) -> list[str | None]:
    """One variant of each text by ``op``: None where the op cannot change a text (an empty text,
    a single word for swap and delete, no known synonym), or where the variant equals the text.
    The draws are made for the whole batch at once and, for swap and delete, turned into
    positions and keep-masks in numpy; only the rewriting of each text is a Python loop."""
    if op not in OP_STREAM:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(TEXT_OPS)}")
    if op in NEEDS_SYNONYMS and synonyms is None:
        raise ValueError(f"op {op!r} needs a synonym table")
    if not texts:
        return []
    on_words = op in EDA_OPS
    split = [split_words(t) for t in texts] if on_words else [(None, None)] * len(texts)
    n_words = np.fromiter((len(w) for w, _ in split), dtype=np.int64, count=len(texts)) if on_words \
        else np.zeros(len(texts), dtype=np.int64)
    need = draws_needed(op, n_words, texts, alpha)
    keys = row_keys(texts, seed, OP_STREAM[op] * 1009 + variant)
    width = int(min(need.max(), _MATRIX_WIDTH))
    u = uniforms(keys, width)
    long_rows = {i: uniforms(keys[i:i + 1], int(need[i]))[0] for i in np.flatnonzero(need > width).tolist()}
    if op == "swap":
        plans = swap_pairs(u, n_words, alpha)
        for i, row in long_rows.items():
            plans[i] = swap_pairs(row[None, :], n_words[i:i + 1], alpha)[0]
    elif op == "delete":
        plans = (u >= alpha).tolist()
        spare = u[np.arange(len(texts)), np.minimum(n_words, width - 1)].tolist()
        for i, row in long_rows.items():
            plans[i], spare[i] = (row >= alpha).tolist(), float(row[n_words[i]])
    else:
        plans = u.tolist()  # Python floats: indexing a list is cheaper than numpy
        for i, row in long_rows.items():
            plans[i] = row.tolist()
    out: list[str | None] = []
    for i, (text, (words, layout)) in enumerate(zip(texts, split)):
        plan = plans[i]
        if not (words if on_words else text.strip()):
            new = None
        elif op == "swap":
            new = random_swap(words, layout, plan)
        elif op == "delete":
            new = random_delete(words, layout, plan, spare[i])
        elif op == "synonym":
            new = synonym_replace(words, layout, plan, alpha, synonyms)
        elif op == "insert":
            new = random_insert(words, layout, plan, alpha, synonyms)
        elif op == "reorder":
            new = reorder_sentences(text, plan)
        elif op == "invert":
            new = invert_clauses(text, plan)
        else:
            new = keyboard_typos(text, plan, alpha)
        out.append(None if new is None or new == text else new)
    return out


def alpha_words(text: str) -> set[str]:
    """The lower-case alphabetic cores of a text's words: what a synonym table must cover."""
    return {m.lower() for m in _ALPHA_WORD.findall(text)}


_TOKEN = re.compile(r"\S+")


def word_slots(texts: Sequence[str], *, seed: int, alpha: float, variant: int = 0) -> list[list[tuple[int, int]]]:
    """For contextual substitution: the character spans of the words to replace in each text,
    n = max(1, round(alpha x words)) alphabetic words that are not stop words, chosen at random,
    in text order (their cores only: "barked." gives the span of "barked")."""
    keys = row_keys(texts, seed, 7919 + variant)
    out = []
    for text, key in zip(texts, keys):
        spans = []
        for m in _TOKEN.finditer(text):
            lead, core, _ = core_of(m.group())
            if core.isalpha() and core.lower() not in ENGLISH_STOP_WORDS:
                start = m.start() + len(lead)
                spans.append((start, start + len(core)))
        n_words = len(text.split())
        if not spans:
            out.append([])
            continue
        u = uniforms(key[None], len(spans))[0]
        chosen = np.argsort(u, kind="stable")[:min(len(spans), count_for(alpha, n_words))]
        out.append(sorted(spans[i] for i in chosen.tolist()))
    return out


def fill_slots(text: str, spans: Sequence[tuple[int, int]], words: Sequence[str | None]) -> str:
    """``text`` with each span replaced by its word (case matched to the original; None: left as is)."""
    out, last = [], 0
    for (start, end), word in zip(spans, words):
        out.append(text[last:start])
        out.append(text[start:end] if word is None else match_case(word, text[start:end]))
        last = end
    out.append(text[last:])
    return "".join(out)
