"""Where unlabelled text comes from. Each source spec is a string:

- a file or folder: ``.txt`` / ``.md`` (split into paragraphs), ``.jsonl`` / ``.json`` / ``.csv`` /
  ``.parquet`` (the ``text_column``), a folder (all of those below it);
- ``hf:<dataset id>[:<config name>]``: ``datasets.load_dataset`` (needs the hub, or its cache);
- ``builtin:pydocs``: docstrings of the installed Python standard library (~1.5 MB of English).

Documents are streamed: text files are read a megabyte at a time and cut into paragraphs as
they arrive, tables and Hugging Face datasets are read from their memory-mapped Arrow cache in
batches, so a corpus larger than memory passes through in bounded memory. A document longer than
``MAX_DOCUMENT_CHARS`` (one enormous line, say) is cut at whitespace into pieces of at most that
size. Bad input raises SelftrainError naming the file.
"""

from __future__ import annotations

import ast
import codecs
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from selftrain.errors import SelftrainError

TEXT_SUFFIXES = {".txt", ".md"}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTINS = ("pydocs",)
MAX_DOCUMENT_CHARS = 1_000_000  # longer documents are cut: no model reads that much context at once
READ_BYTES = 1 << 20
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def load_documents(specs: str | list[str], **options) -> list[tuple[str, str]]:
    """``iter_documents`` as a list (small inputs: task files, a bench's texts)."""
    return list(iter_documents(specs, **options))


def iter_documents(
    specs: str | list[str],
    *,
    text_column: str = "text",
    hf_split: str = "train",
    paragraphs: bool = True,
) -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)`` from every spec, in a deterministic order, in bounded memory."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise SelftrainError("data.train names no source")
    for spec in specs:
        if spec.startswith("builtin:"):
            name = spec.split(":", 1)[1]
            if name != "pydocs":
                raise SelftrainError(f"unknown builtin data {spec!r}; available: builtin:pydocs")
            yield from ((spec, d) for d in python_docstrings())
        elif spec.startswith("hf:"):
            yield from ((spec, t) for t in _load_hf(spec[3:], text_column, hf_split))
        else:
            yield from _load_path(Path(spec), text_column, paragraphs)


def python_docstrings() -> list[str]:
    """Docstrings of the standard library's modules, classes and functions (parsed, not imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
    out = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    if not out:
        raise SelftrainError(f"no Python docstrings found under {root}")
    return out


def _load_path(path: Path, text_column: str, paragraphs: bool) -> Iterator[tuple[str, str]]:
    if not path.exists():
        hint = " (for a Hugging Face dataset write hf:<id>)" if "/" in str(path) else ""
        raise SelftrainError(f"data path not found: {path}{hint}")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | set(TABLE_SUFFIXES)
        )
        if not files:
            raise SelftrainError(
                f"data folder {path} holds no .txt, .md, .jsonl, .csv or .parquet files"
            )
    else:
        files = [path]
    for f in files:
        suffix = f.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            yield from ((str(f), t) for t in _load_table(f, TABLE_SUFFIXES[suffix], text_column))
        else:
            yield from ((str(f), t) for t in iter_text_file(f, paragraphs))


def iter_text_file(path: Path, paragraphs: bool = True) -> Iterator[str]:
    """The file's paragraphs (blank-line separated, stripped; or the whole file), read a megabyte at
    a time; a piece longer than MAX_DOCUMENT_CHARS is cut at whitespace."""
    buffer, scan_from = "", 0
    for chunk in _decoded_chunks(Path(path)):
        buffer += chunk
        if paragraphs:
            start = 0
            for m in _PARAGRAPH_BREAK.finditer(buffer, scan_from):
                if buffer[start:m.start()].strip():
                    yield from _cut(buffer[start:m.start()].strip())
                start = m.end()
            buffer = buffer[start:]
            # a break can only begin in the trailing whitespace of what is left
            scan_from = len(buffer.rstrip())
        while len(buffer) > MAX_DOCUMENT_CHARS:
            piece, buffer = _split_at_space(buffer)
            scan_from = max(0, scan_from - len(piece))
            if piece.strip():
                yield piece.strip() if paragraphs else piece
    if buffer.strip():
        yield buffer.strip() if paragraphs else buffer


def _decoded_chunks(path: Path) -> Iterator[str]:
    """UTF-8 text in pieces, or a clear error: binary content (NUL bytes) and other encodings are refused."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_BYTES):
                if offset == 0 and b"\x00" in chunk[:65536]:
                    raise SelftrainError(f"{path} looks binary (contains NUL bytes); give a UTF-8 text file")
                pending = len(decoder.getstate()[0])  # bytes of a character the last chunk began
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise SelftrainError(f"{path} is not UTF-8 text (byte {offset - pending + e.start}): convert "
                                         "it or remove it") from None
                offset += len(chunk)
                yield text
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise SelftrainError(f"{path} is not UTF-8 text (it ends inside a character): convert it or "
                                     "remove it") from None
    except OSError as e:
        raise SelftrainError(f"cannot read {path}: {e.strerror or e}") from None


def _split_at_space(text: str) -> tuple[str, str]:
    """(head of at most MAX_DOCUMENT_CHARS, rest), cut after the last whitespace in the head if any."""
    cut = max(text.rfind(" ", 0, MAX_DOCUMENT_CHARS), text.rfind("\n", 0, MAX_DOCUMENT_CHARS)) + 1
    cut = cut if cut > MAX_DOCUMENT_CHARS // 2 else MAX_DOCUMENT_CHARS
    return text[:cut], text[cut:]


def _cut(text: str) -> Iterator[str]:
    while len(text) > MAX_DOCUMENT_CHARS:
        piece, text = _split_at_space(text)
        yield piece.strip()
    yield text


def _load_table(path: Path, builder: str, text_column: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise SelftrainError(f"cannot read {path} as {builder}: {type(e).__name__}: {e}") from None
    return _text_column(ds, text_column, str(path))


def _load_hf(spec: str, text_column: str, split: str) -> Iterator[str]:
    import datasets

    name, _, subset = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:
        raise SelftrainError(
            f"cannot load Hugging Face dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "Offline? Use a local file, or set HF_DATASETS_OFFLINE=0 with network access."
        ) from None
    return _text_column(ds, text_column, f"hf:{spec}")


def _text_column(ds, column: str, where: str) -> Iterator[str]:
    """The string values of ``column``, read from the (memory-mapped) dataset in batches."""
    if column not in ds.column_names:
        raise SelftrainError(
            f"{where} has no column {column!r}; its columns: {', '.join(ds.column_names)} "
            "(set data.text_column)"
        )
    for batch in ds.select_columns([column]).iter(batch_size=1000):
        for t in batch[column]:
            if isinstance(t, str):
                yield from _cut(t)
