"""Errors a user can fix. The CLI prints their message (no traceback) and exits with code 2."""


class SelftrainError(Exception):
    """A problem with the user's input: config, data, model path. Message says what and how to fix."""

    exit_code = 2
