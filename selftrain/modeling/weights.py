"""Weights come from safetensors files only: unpickling a ``pytorch_model.bin`` can run any code
the file carries, so a model directory from elsewhere is refused unless it holds safetensors."""

from __future__ import annotations

from pathlib import Path

from selftrain.errors import SelftrainError

PICKLED = ("pytorch_model*.bin", "model*.bin", "*.pt", "*.pth", "*.ckpt")


def safetensors_only(path: Path | str, what: str = "model") -> dict:
    """Raise for a local directory with pickled weights and no safetensors; return the
    ``from_pretrained`` keywords that make transformers refuse pickles everywhere else (the hub)."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickled = sorted({p.name for pattern in PICKLED for p in path.glob(pattern)})
        if pickled:
            raise SelftrainError(
                f"{what} {path} holds pickled weights ({', '.join(pickled[:3])}) and no .safetensors file. "
                "selftrain loads safetensors only, because unpickling a file runs whatever code it carries. "
                "If you trust the file, convert it once in a process of your own: load it with transformers and "
                "save_pretrained(..., safe_serialization=True)")
    return {"use_safetensors": True}
