"""Turning user text into prompt token ids: raw, or through the model's chat template."""

from __future__ import annotations

from specserve.errors import RequestError


def raw_prompt_ids(tokenizer, text: str) -> list[int]:
    if not isinstance(text, str) or text == "":
        raise RequestError("the prompt is empty: send at least one character of text", "prompt")
    return tokenizer.encode(text, add_special_tokens=True)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Apply the model's chat template (with the assistant turn opened) and tokenize."""
    if not messages:
        raise RequestError("messages is empty: send at least one message", "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template: send a raw prompt instead", "messages")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja errors for malformed messages
        raise RequestError(f"the chat template rejected the messages: {exc}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)
