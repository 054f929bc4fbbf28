"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2."""

import errno


class SelftrainError(Exception):
    """A problem with the user's input: config, data, model path. Message says what and how to fix."""

    exit_code = 2


class DiskFull(SelftrainError):
    """A write failed for lack of space. Every write is atomic, so the run is as it was last saved."""


# How a full disk shows when the OSError is wrapped: safetensors and Arrow keep its text; torch.save
# (Trainer's optimizer.pt, rng_state.pth) raises "unexpected pos" from a stream that failed to write.
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "unexpected pos", "PytorchStreamWriter failed writing")


def disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from, is a full disk, an exceeded quota, or a
    write that failed as one does (measured on a full tmpfs: see RELIABILITY.md)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(error) for s in DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False
