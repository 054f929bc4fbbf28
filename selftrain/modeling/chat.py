"""Prompts in the tokenizer's chat template, or as plain text: the one place that renders them.

``use_chat`` resolves a config's ``chat: true | false | auto`` against the tokenizer;
``render_prompt`` turns a user text (or a list of messages) into the prompt the model continues,
ending in the assistant header when ``chat`` is on, and gives the plain-text form otherwise.
"""

from __future__ import annotations

from selftrain.errors import SelftrainError

Messages = list[dict]  # [{"role": "user" | "assistant" | "system", "content": str}, ...]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(chat: bool | str, tokenizer, *, what: str = "chat") -> bool:
    """``chat`` resolved: ``"auto"`` is on exactly when the tokenizer has a chat template; ``True``
    without one is an error (``what`` names the setting in it)."""
    if chat == "auto":
        return has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise SelftrainError(f"{what}=true, but the tokenizer has no chat template")
    return bool(chat)


def render_prompt(tokenizer, content: str | Messages, *, chat: bool, plain: str | None = None) -> str:
    """The prompt for ``content``: a user text, or a list of messages (a multi-turn conversation).

    ``chat``: the messages (a text is one user turn) in the tokenizer's chat template, ending in the
    assistant header so the model answers next. Otherwise ``plain``, the caller's plain-text form
    (by default a text as it is; a list of messages needs one).
    """
    if not chat:
        if plain is not None:
            return plain
        if isinstance(content, str):
            return content
        raise ValueError("render_prompt: a list of messages needs `plain` when chat is off")
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else list(content)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
