"""WordNet's lexicographer categories, read from the database files (used only to measure).

Princeton WordNet 3.0 ships as plain ``index.<pos>`` / ``data.<pos>`` files (format: wndb(5WN));
Debian's ``wordnet-base`` package puts them in ``/usr/share/wordnet`` and nltk's downloader in
``nltk_data/corpora/wordnet``. Every synset line carries its lexicographer file number — one of
45 coarse categories such as ``noun.food``, ``noun.time``, ``adj.all`` — and each index line lists
a word's synsets most frequent sense first, which is all a word-category score needs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from selftrain.errors import SelftrainError

# lexnames(5WN): the lexicographer file names in file-number order (fixed since WordNet 1.5)
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
POS_FILES = ("noun", "verb", "adj", "adv")
SEARCH = ("/usr/share/wordnet", "~/nltk_data/corpora/wordnet", "/usr/share/nltk_data/corpora/wordnet",
          "/usr/local/share/nltk_data/corpora/wordnet")


def wordnet_dir() -> Path | None:
    """The first directory holding the WordNet database: ``$SELFTRAIN_WORDNET``, then Debian's and
    nltk's usual places."""
    for place in (os.environ.get("SELFTRAIN_WORDNET"), *SEARCH):
        if place and (Path(place).expanduser() / "data.noun").is_file():
            return Path(place).expanduser()
    return None


def primary_lexnames(words: set[str] | None = None, path: Path | None = None) -> dict[str, str]:
    """``{word: lexname of its most frequent sense}``: over the parts of speech a word has, the one
    whose first sense was tagged most often in the sense-tagged corpus (ties: noun, verb, adjective,
    adverb). Only ``words`` when given (lower-case, spaces as ``_``)."""
    path = path or wordnet_dir()
    if path is None:
        raise SelftrainError("WordNet is not installed: apt-get install wordnet-base (Debian), or set "
                             "SELFTRAIN_WORDNET to a directory holding data.noun and index.noun")
    best: dict[str, tuple[int, int, str, int]] = {}  # word -> (-tagged count, pos rank, pos, first offset)
    for rank, pos in enumerate(POS_FILES):
        for line in _lines(path / f"index.{pos}"):
            fields = line.split()
            word = fields[0]
            if words is not None and word not in words:
                continue
            n_synsets, n_pointers = int(fields[2]), int(fields[3])
            tagged = int(fields[5 + n_pointers])
            first_offset = int(fields[6 + n_pointers])
            key = (-tagged, rank, pos, first_offset)
            if n_synsets and (word not in best or key < best[word]):
                best[word] = key
    wanted: dict[str, set[int]] = {}
    for _, _, pos, offset in best.values():
        wanted.setdefault(pos, set()).add(offset)
    lexname_of: dict[tuple[str, int], str] = {}
    for pos, offsets in wanted.items():
        for line in _lines(path / f"data.{pos}"):
            offset, filenum = line.split(" ", 2)[:2]
            if int(offset) in offsets:
                lexname_of[(pos, int(offset))] = LEXNAMES[int(filenum)]
    return {w: lexname_of[(pos, off)] for w, (_, _, pos, off) in best.items() if (pos, off) in lexname_of}


def _lines(file: Path):
    """The database lines of a WordNet file, skipping its licence header (lines starting with two spaces)."""
    with open(file, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("  "):
                yield line


_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: "galore(ip)"


def synonyms(words: set[str] | None = None, path: Path | None = None) -> dict[str, tuple[str, ...]]:
    """``{word: its synonyms}`` from WordNet: the other members of every synset the word belongs to
    (all parts of speech, all senses, as EDA does), single alphabetic lower-case words only, sorted.
    Only ``words`` (lower-case) when given. Words are looked up in their base form: "dogs" and
    "barked" are not in WordNet's index, so an inflected word is left alone rather than replaced by
    a wrongly inflected synonym."""
    path = path or wordnet_dir()
    if path is None:
        raise SelftrainError("WordNet is not installed: apt-get install wordnet-base (Debian), or set "
                             "SELFTRAIN_WORDNET to a directory holding data.noun and index.noun")
    found: dict[str, set[str]] = {}
    for pos in POS_FILES:
        for line in _lines(path / f"data.{pos}"):
            fields = line.split(" ", 4 + 2 * 64)
            members = []
            for k in range(int(fields[3], 16)):
                word = _MARKER.sub("", fields[4 + 2 * k]).lower()
                if word.isalpha() and word.isascii():
                    members.append(word)
            if len(members) < 2:
                continue
            for word in members:
                if words is None or word in words:
                    found.setdefault(word, set()).update(m for m in members if m != word)
    return {w: tuple(sorted(s)) for w, s in found.items() if s}
