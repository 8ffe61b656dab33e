"""Chat messages in, replies out: the generation code `llmops serve` and the registered MLflow model share.

Chat messages as clients send them (`{"role", "content"}`) become model input here and nowhere else: the HTTP
app renders a request's prompt with `prompt_ids` (its engine generates from those ids), the follower loads a
version with `load_generator`, and the MLflow model logged with each version (`llmops.packaging`) answers with
`reply`. It imports neither the HTTP app nor the packaging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from llmops.chat import render_prompt
from llmops.data import Turn
from llmops.devices import resolve_placement
from llmops.modeling import Generation, generate, load_model, load_tokenizer


def _conversation_prompt(messages: Sequence[dict[str, str]]) -> list[Turn]:
    """Chat messages as the conversation turns training rendered (`llmops.chat`): the one place they meet."""
    return [Turn(m["role"], m["content"]) for m in messages]


def prompt_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The model input for `messages`, as generation sees it (`llmops.chat.render_prompt`)."""
    return render_prompt(tokenizer, _conversation_prompt(messages))


def reply(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    on_text: Callable[[str], None] | None = None,
) -> list[Generation]:
    """Greedy replies to conversations, stopping at EOS exactly as evaluation does; `on_text` streams the reply
    to a single conversation piece by piece (`llmops.modeling.generate`)."""
    prompts = [_conversation_prompt(c) for c in conversations]
    return generate(model, tokenizer, prompts, max_new_tokens, on_text=on_text)


def load_generator(folder: str | Path):
    """(model, tokenizer) from a model folder, checked to generate: a version that cannot answer fails here."""
    placement = resolve_placement()  # the serving host's own: its GPU in bf16 if it has one, else the CPU
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, dtype=placement.dtype, device=placement.device)
    reply(model, tokenizer, [[{"role": "user", "content": "ping"}]], max_new_tokens=1)
    return model, tokenizer
