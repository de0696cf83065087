"""OpenAI response objects (whole responses and stream chunks) for one request."""

from __future__ import annotations

import time
import uuid
from typing import Any

from specserve.engine.outputs import RequestOutput
from specserve.server.protocol import GenerationRequest


def spec_stats(output: RequestOutput) -> dict[str, Any]:
    """Our vendor field: how speculation went for one choice, and the policy it ran under."""
    stats: dict[str, Any] = {
        "num_steps": output.num_steps,
        "num_draft_tokens": output.num_draft_tokens,
        "num_accepted_tokens": output.num_accepted_tokens,
        "accepted_per_depth": list(output.accepted_per_depth),
        "mean_accepted_length": round(output.mean_accepted_length, 4),
        "num_switch_offs": output.num_switch_offs,
        "num_switch_ons": output.num_switch_ons,
        "num_probe_steps": output.num_probe_steps,
        "num_switched_off_steps": output.num_switched_off_steps,
    }
    policy = output.speculation
    if policy is not None:
        stats["speculation"] = {"enabled": policy.enabled, "max_tree_tokens": policy.max_tree_tokens,
                                "max_depth": policy.max_depth, "drafters": list(policy.drafters or ())}
    return stats


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


class ResponseBuilder:
    """Builds the JSON objects of one completions or chat response, streamed or whole."""

    def __init__(self, request: GenerationRequest, model_name: str) -> None:
        self.request = request
        self.is_chat = request.kind == "chat"
        prefix = "chatcmpl" if self.is_chat else "cmpl"
        self.response_id = f"{prefix}-{uuid.uuid4().hex}"
        self.model_name = model_name
        self.created = int(time.time())

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model_name}

    # ---- streaming -----------------------------------------------------------------------

    def role_chunk(self, index: int) -> dict[str, Any]:
        """Chat streams open every choice with the assistant role and empty content."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return self._chunk([choice])

    def delta_chunk(
        self, index: int, delta: str, final: RequestOutput | None, accepted_tokens: int | None = None
    ) -> dict[str, Any]:
        """New text of one choice; ``final`` (its finished output) adds finish_reason and stats;
        ``accepted_tokens``: how many of the chunk's tokens were accepted drafts (None: left out)."""
        choice: dict[str, Any] = {"index": index}
        if self.is_chat:
            choice["delta"] = {"content": delta} if delta or final is None else {}
        else:
            choice["text"] = delta
        choice["logprobs"] = None
        choice["finish_reason"] = final.finish_reason if final is not None else None
        if accepted_tokens is not None:
            choice["accepted_tokens"] = accepted_tokens
        if final is not None and self.request.return_spec_stats:
            choice["spec_stats"] = spec_stats(final)
        return self._chunk([choice])

    def usage_chunk(self, num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, Any]:
        chunk = self._envelope("chat.completion.chunk" if self.is_chat else "text_completion")
        chunk["choices"] = []
        chunk["usage"] = usage(num_prompt_tokens, num_completion_tokens)
        return chunk

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = self._envelope("chat.completion.chunk" if self.is_chat else "text_completion")
        chunk["choices"] = choices
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    # ---- whole response ------------------------------------------------------------------

    def response(self, finals: list[RequestOutput], num_prompt_tokens: int) -> dict[str, Any]:
        """``finals`` are the finished outputs in choice order."""
        choices = []
        for index, output in enumerate(finals):
            choice: dict[str, Any] = {"index": index}
            if self.is_chat:
                choice["message"] = {"role": "assistant", "content": output.text}
            else:
                choice["text"] = output.text
            choice["logprobs"] = None
            choice["finish_reason"] = output.finish_reason
            if self.request.return_spec_stats:
                choice["spec_stats"] = spec_stats(output)
            choices.append(choice)
        body = self._envelope("chat.completion" if self.is_chat else "text_completion")
        body["choices"] = choices
        body["usage"] = usage(num_prompt_tokens, sum(o.num_generated_tokens for o in finals))
        return body
