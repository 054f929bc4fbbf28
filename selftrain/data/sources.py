"""Where unlabelled text comes from. Each source spec is a string:

- a file or folder: ``.txt`` / ``.md`` (split into paragraphs), ``.jsonl`` / ``.json`` / ``.csv`` /
  ``.parquet`` (the ``text_column``), a folder (all of those below it);
- ``hf:<dataset id>[:<config name>]``: ``datasets.load_dataset`` (needs the hub, or its cache);
- ``builtin:pydocs``: docstrings of the installed Python standard library (~1.5 MB of English).

Every loader returns a list of document strings; bad input raises SelftrainError naming the file.
"""

from __future__ import annotations

import ast
import re
import sysconfig
from pathlib import Path

from selftrain.errors import SelftrainError

TEXT_SUFFIXES = {".txt", ".md"}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BUILTINS = ("pydocs",)


def load_documents(
    specs: str | list[str],
    *,
    text_column: str = "text",
    hf_split: str = "train",
    paragraphs: bool = True,
) -> list[tuple[str, str]]:
    """Return ``(source, text)`` pairs from every spec, in a deterministic order."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise SelftrainError("data.train names no source")
    docs: list[tuple[str, str]] = []
    for spec in specs:
        if spec.startswith("builtin:"):
            name = spec.split(":", 1)[1]
            if name != "pydocs":
                raise SelftrainError(f"unknown builtin data {spec!r}; available: builtin:pydocs")
            docs += [(spec, d) for d in python_docstrings()]
        elif spec.startswith("hf:"):
            docs += [(spec, t) for t in _load_hf(spec[3:], text_column, hf_split)]
        else:
            docs += _load_path(Path(spec), text_column, paragraphs)
    return docs


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


def _load_path(path: Path, text_column: str, paragraphs: bool) -> list[tuple[str, str]]:
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
    docs = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix in TABLE_SUFFIXES:
            docs += [(str(f), t) for t in _load_table(f, TABLE_SUFFIXES[suffix], text_column)]
        else:
            text = read_text_file(f)
            parts = split_paragraphs(text) if paragraphs else [text]
            docs += [(str(f), p) for p in parts]
    return docs


def read_text_file(path: Path) -> str:
    """UTF-8 text or a clear error: binary content (NUL bytes) and other encodings are refused."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise SelftrainError(f"{path} looks binary (contains NUL bytes); give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SelftrainError(f"{path} is not UTF-8 text (byte {e.start}): convert it or remove it") from None


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _load_table(path: Path, builder: str, text_column: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise SelftrainError(f"cannot read {path} as {builder}: {type(e).__name__}: {e}") from None
    return _text_column(ds, text_column, str(path))


def _load_hf(spec: str, text_column: str, split: str) -> list[str]:
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


def _text_column(ds, column: str, where: str) -> list[str]:
    if column not in ds.column_names:
        raise SelftrainError(
            f"{where} has no column {column!r}; its columns: {', '.join(ds.column_names)} "
            "(set data.text_column)"
        )
    return [t for t in ds[column] if isinstance(t, str)]
