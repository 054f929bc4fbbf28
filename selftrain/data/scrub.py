"""Scrub e-mail addresses, phone numbers and key-like strings out of synthetic text before it
enters the pool. A model that trains on its own output must not pass on a secret it once read:
one that writes an API key it memorised would otherwise learn it again, round after round.

Patterns are deliberately narrow (a phone number needs a ``+``, brackets or dashes; a key needs
a known prefix, a ``key=`` / ``token:`` label, or 32+ characters that mix letters and 4+ digits
with high entropy), so ordinary numbers, dates and words stay. What is removed is counted, per kind.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

KINDS = ("email", "phone", "key")
PLACEHOLDER = {"email": "<email>", "phone": "<phone>", "key": "<secret>"}

EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # international: +44 20 7946 0958, +1 (555) 123-4567
    r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3,4}[.-]\d{4}"  # 555-123-4567, 555.123.4567
    r")(?![\w])")
KEY_SHAPES = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)"  # PEM blocks, even cut short
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bgithub_pat_[A-Za-z0-9_]{40,}"  # GitHub tokens
    r"|\bsk-[A-Za-z0-9_-]{20,}|\bxox[abprs]-[A-Za-z0-9-]{10,}"  # API keys of the sk- kind, Slack tokens
    r"|\bAIza[0-9A-Za-z_-]{35}\b"  # Google API keys
    r"|(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JSON web tokens
    re.DOTALL)
# `api_key = "..."`, `password: ...`: the value after a secret-sounding label
LABELLED = re.compile(r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|token|password|"
                      r"passwd)\s*[:=]\s*[\"']?)([A-Za-z0-9_+/.@#$%!&*-]{8,}={0,2})(?=[\s\"',;)&]|$)")
# (no "=" inside a value, only as base64 padding: "token=token=..." must not make the scan quadratic)
LONG_TOKEN = re.compile(r"(?<![\w+=/-])[A-Za-z0-9_+=-]{32,}(?![\w+=-])")  # no "/": paths and URLs are not keys


def _key_like(token: str) -> bool:
    """32+ characters, letters and 4+ digits, high entropy: a key, a token, a digest."""
    if not re.search(r"[A-Za-z]", token) or sum(ch.isdigit() for ch in token) < 4:  # an_identifier_like_this_2
        return False
    if len(re.findall(r"(?:^|[-_])[A-Za-z]{3,}(?=[-_]|$)", token)) >= 3:  # words: 577452-a-memoize-decorator-for
        return False
    counts = Counter(token)
    entropy = -sum(c / len(token) * math.log2(c / len(token)) for c in counts.values())
    return entropy >= 3.0  # hex digests (~3.7) included; words repeat letters


def _phone_like(match: str) -> bool:
    """8-15 digits, grouped by two or more separators (+44 20 7946 0958), or +digits alone (E.164):
    a signed decimal such as +35236450.6 (one separator) is a number, not a phone."""
    digits, separators = sum(ch.isdigit() for ch in match), sum(ch in " .-()" for ch in match)
    return 8 <= digits <= 15 and (separators >= 2 or (separators == 0 and digits >= 10))


def _labelled_value(match: str) -> bool:
    """The value after ``token =``: a secret has a digit or is long; ``token = tokens_list`` is code."""
    value = LABELLED.fullmatch(match).group(2)
    return any(ch.isdigit() for ch in value) or len(value) >= 16


def scrub(text: str, kinds: tuple[str, ...] | list[str] = KINDS) -> tuple[str, Counter]:
    """``text`` with every found item of ``kinds`` replaced by its placeholder, and the count per kind."""
    found: Counter = Counter()

    def sub(pattern, kind, text, repl=None, keep=None):
        def one(m):
            if keep is not None and not keep(m.group(0)):
                return m.group(0)
            found[kind] += 1
            return repl(m) if repl else PLACEHOLDER[kind]
        return pattern.sub(one, text)

    if "key" in kinds:  # first: a key can contain an @ or look like digits
        text = sub(KEY_SHAPES, "key", text)
        text = sub(LABELLED, "key", text, repl=lambda m: m.group(1) + PLACEHOLDER["key"], keep=_labelled_value)
        text = sub(LONG_TOKEN, "key", text, keep=_key_like)
    if "email" in kinds:
        text = sub(EMAIL, "email", text)
    if "phone" in kinds:
        text = sub(PHONE, "phone", text, keep=_phone_like)
    return text, found


def scrub_examples(examples: list[dict], kinds) -> tuple[list[dict], Counter]:
    """The examples with their text scrubbed, and the strings of their ``meta`` JSON too (an
    instruction, an input, a completion: later stages train on those), provenance unchanged; and
    the counts over all texts (an item found in both the text and its meta counts once)."""
    total: Counter = Counter()
    out = []
    for ex in examples:
        text, found = scrub(ex["text"], kinds)
        if found:
            ex = {**ex, "text": text}
        try:
            meta = json.loads(ex["meta"]) if isinstance(ex.get("meta"), str) and ex["meta"] else None
        except ValueError:  # not JSON: the runner's own check fails the stage for it
            meta = None
        if meta is not None:
            in_meta: Counter = Counter()
            clean = _scrub_strings(meta, kinds, in_meta)
            if in_meta:
                ex = {**ex, "meta": json.dumps(clean, sort_keys=True)}
                found = found | in_meta  # per kind, the larger count: the text usually repeats the meta
        total.update(found)
        out.append(ex)
    return out, total


def _scrub_strings(value, kinds, found: Counter):
    if isinstance(value, str):
        text, n = scrub(value, kinds)
        found.update(n)
        return text
    if isinstance(value, dict):
        return {k: _scrub_strings(v, kinds, found) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_strings(v, kinds, found) for v in value]
    return value
