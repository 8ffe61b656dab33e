"""The one rendering of a conversation into token ids: training, evaluation, validation's lengths, drift,
quantization's calibration and the registered model all call it, so they cannot disagree about a prompt.

The tokenizer's own chat template is used when it has one (`data.chat_template` can set one from a Jinja
file); otherwise the project's plain template, which is itself a Jinja chat template. The loss mask comes from
rendering the conversation turn by turn and diffing the prefixes: each assistant turn is the text its own
rendering adds to the rendering of the turns before it (with the generation prompt). That works with any
template, unlike `return_assistant_tokens_mask`, which needs `{% generation %}` markers most templates lack.
Each piece of text is tokenized on its own and the ids concatenated, so the ids of a prompt at training time
are, by construction, the ids `render_prompt` gives to `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from llmops.data import Conversation, Turn
from llmops.errors import LLMOpsError

IGNORE_INDEX = -100  # label value the loss skips: prompt tokens and padding

# The project's plain template, for tokenizers without one: a single exchange renders exactly as
# "<s>### Instruction:\n{prompt}\n### Response:\n{response}</s>".
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n"
    "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def load_chat_template(path: Path | None) -> str | None:
    """The Jinja text of `data.chat_template`, or None when it is unset."""
    if path is None:
        return None
    if not path.is_file():
        raise LLMOpsError(
            f"data.chat_template {path} does not exist. Give a Jinja chat template file, or unset it to use the "
            "tokenizer's own template (or the plain one)."
        )
    return path.read_text(encoding="utf-8")


def _text(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            [t.as_message() for t in turns],
            chat_template=tokenizer.chat_template or PLAIN_TEMPLATE,
            add_generation_prompt=generation_prompt,
            tokenize=False,
        )
    except Exception as exc:  # a Jinja error, or a template's own raise_exception (e.g. no system role)
        raise LLMOpsError(
            f"The chat template could not render a conversation ({type(exc).__name__}: {exc}). Fix the "
            "template (data.chat_template or the tokenizer's), or the data's roles."
        ) from None


def _pieces(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], generation_prompt: bool
) -> list[tuple[str, bool]]:
    """The rendered text cut into pieces, each marked True when it is an assistant turn (supervised)."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    ends = [i for i, t in enumerate(turns) if t.role == "assistant"]
    for end in ends:
        prompt = _text(tokenizer, turns[:end], generation_prompt=True)
        full = _text(tokenizer, turns[: end + 1], generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LLMOpsError(
                "The chat template renders earlier turns differently once later turns follow, so the loss cannot "
                "be restricted to assistant turns. Use a template whose rendering of a conversation starts with "
                "the rendering of its beginning (data.chat_template)."
            )
        pieces += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    if generation_prompt:
        tail = _text(tokenizer, turns, generation_prompt=True)
        if not tail.startswith(done):
            raise LLMOpsError("The chat template renders a prompt differently from the start of its conversation.")
        pieces.append((tail[len(done) :], False))
    return pieces


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def render(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_seq_len: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and its labels: the ids on every assistant turn (each ending in
    EOS, which is added where the template does not put it), IGNORE_INDEX elsewhere. Cut to `max_seq_len`
    at the end (the validate stage has already dropped or shortened what does not fit)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, supervised in _pieces(tokenizer, conversation.turns, generation_prompt=False):
        ids = _ids(tokenizer, text)
        if supervised and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)  # generation stops at EOS: every answer must teach it
        input_ids += ids
        labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return input_ids[:max_seq_len], labels[:max_seq_len]


def render_prompt(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn] | str) -> list[int]:
    """Token ids to generate the next assistant turn from (the template's generation prompt included).
    A plain string is one user turn."""
    if isinstance(turns, str):
        turns = (Turn("user", turns),)
    ids: list[int] = []
    for text, supervised in _pieces(tokenizer, turns, generation_prompt=True):
        piece = _ids(tokenizer, text)
        if supervised and tokenizer.eos_token_id not in piece:
            piece.append(tokenizer.eos_token_id)
        ids += piece
    return ids
