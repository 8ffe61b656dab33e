"""The one rendering of a conversation into token ids: training, evaluation, validation's lengths, drift,
quantization's calibration and the registered model all call it, so they cannot disagree about a prompt.

The tokenizer's own chat template is used when it has one (`data.chat_template` can set one from a Jinja
file); otherwise the project's plain template, which is itself a Jinja chat template. A conversation is
rendered to text once and that whole text is tokenized once, exactly as `apply_chat_template(...,
tokenize=True)` does: the ids are the ids any server using the same template sends, for the prompt and for
the whole conversation.

The loss mask comes from the rendered text, not from `return_assistant_tokens_mask` (which needs `{%
generation %}` markers most templates lack): each assistant turn's characters are what rendering it adds to
the rendering of the turns before it (with the generation prompt), and the tokens covering them are
supervised. That works with any template whose rendering of a conversation starts with the rendering of its
beginning; a template that renders a conversation otherwise, or raises on it (strict role alternation), is
`TemplateRefused`, which cleaning answers by repairing or dropping the row (`tasks/validate.py`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import _compile_jinja_template

from llmops.data import Conversation, Turn
from llmops.errors import LLMOpsError

IGNORE_INDEX = -100  # label value the loss skips: prompt tokens and padding

# The project's plain template, for tokenizers without one: a single exchange renders exactly as
# "<s>### Instruction:\n{prompt}\n### Response:\n {response}</s>". The space before the response makes it
# start a word, as words start in pretraining text (a byte-level tokenizer's "Ġbrown", not "b" "row" "n").
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n"
    "{% else %}### Response:\n {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


class TemplateRefused(LLMOpsError):
    """The chat template cannot render this conversation: it raises on it (e.g. roles that must alternate,
    no system role), or renders the beginning of the conversation differently once later turns follow."""


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


def template_text(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], generation_prompt: bool) -> str:
    """The template's text for `turns`, as `apply_chat_template(..., tokenize=False)` gives it (which refuses
    an empty conversation; here it renders, for the prompt of an opening assistant turn).

    The template is compiled by transformers' own (cached) compiler and given what `apply_chat_template`
    gives it, without the per-call conversion of the messages, which costs more than the rendering itself."""
    template = tokenizer.chat_template or PLAIN_TEMPLATE
    try:
        return _compile_jinja_template(template).render(
            messages=[t.as_message() for t in turns],
            tools=None,
            documents=None,
            add_generation_prompt=generation_prompt,
            **tokenizer.special_tokens_map,
        )
    except Exception as exc:  # a Jinja error, or a template's own raise_exception (e.g. no system role)
        raise TemplateRefused(
            f"The chat template could not render a conversation ({type(exc).__name__}: {exc}). Fix the "
            "template (data.chat_template or the tokenizer's), or the data's roles."
        ) from None


@dataclass(frozen=True)
class RenderedText:
    """A conversation as the template renders it, with the character spans of its assistant turns."""

    text: str
    answers: tuple[tuple[int, int], ...]  # [start, end) of each assistant turn that trains
    last_answer: int  # where the last assistant turn starts (len(text) when there is none)


def render_text(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn]) -> RenderedText:
    """Render once, and find each assistant turn's characters: from the end of the prompt that precedes it
    (the turns before it, with the generation prompt) to where its own rendering stops agreeing with the whole
    (a template may close a conversation with something that is not part of the turn, e.g. Phi-3's EOS).

    Raises:
        TemplateRefused: the template raises on the conversation, or its rendering of an earlier part is not
            the start of the whole.
    """
    whole = template_text(tokenizer, turns, generation_prompt=False)
    answers: list[tuple[int, int]] = []
    done = last = 0
    for index, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = template_text(tokenizer, turns[:index], generation_prompt=True)
        alone = whole if index == len(turns) - 1 else template_text(tokenizer, turns[: index + 1], False)
        end = _common_prefix(alone, whole)
        if len(prompt) < done or not whole.startswith(prompt) or not alone.startswith(prompt) or end <= len(prompt):
            raise TemplateRefused(
                "The chat template renders the start of a conversation differently once later turns follow, so "
                "its assistant turns cannot be told apart (the prompt before assistant turn "
                f"{index + 1} is not how the whole conversation begins). Use a template whose rendering of a "
                "conversation starts with the rendering of its beginning (data.chat_template)."
            )
        if turn.train:
            answers.append((len(prompt), end))
        done, last = end, len(prompt)
    return RenderedText(whole, tuple(answers), last if done else len(whole))


def _common_prefix(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))  # binary search on the longest common prefix
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of every special token (added control tokens included): a supervised turn that holds one of them
    teaches the model to end its turn there."""
    added = [i for i, token in tokenizer.added_tokens_decoder.items() if token.special]
    return frozenset([*tokenizer.all_special_ids, *added])


def render(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, max_seq_len: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and its labels: the ids on every assistant turn that trains,
    IGNORE_INDEX elsewhere. The ids are `apply_chat_template(conversation, tokenize=True)`'s. An answer must
    teach the model to stop: a template that closes a turn with no special token gets EOS appended after
    each answer. Cut to `max_seq_len` at the end (the validate stage has already dropped or shortened what
    does not fit).

    Raises:
        TemplateRefused: the template cannot render the conversation (see `render_text`).
    """
    rendered = render_text(tokenizer, conversation.turns)
    encoding = tokenizer(rendered.text, add_special_tokens=False)
    ids = encoding["input_ids"]
    special = _special_ids(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    position = 0
    for first, last in _answer_tokens(encoding, rendered, len(ids)):
        answer = ids[first:last]
        if not special.intersection(answer):
            answer = [*answer, tokenizer.eos_token_id]  # generation stops at EOS: every answer must teach it
        input_ids += ids[position:first] + answer
        labels += [IGNORE_INDEX] * (first - position) + answer
        position = last
    input_ids += ids[position:]
    labels += [IGNORE_INDEX] * (len(ids) - position)
    return input_ids[:max_seq_len], labels[:max_seq_len]


def _answer_tokens(encoding, rendered: RenderedText, length: int) -> list[tuple[int, int]]:
    """[first, last) token range of each answer: from the token holding its first character (a word's
    leading space may belong to the prompt) to the token holding the first character after it, excluded (a
    character-level end can fall inside the next turn's control token: Phi-3's `<|endoftext|>` and `<|user|>`
    share their first characters)."""
    ends = len(rendered.text), length
    return [(_token_at(encoding, start, *ends), _token_at(encoding, end, *ends)) for start, end in rendered.answers]


def render_prompt(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn] | str) -> list[int]:
    """Token ids to generate the next assistant turn from: `apply_chat_template(turns,
    add_generation_prompt=True, tokenize=True)`. A plain string is one user turn."""
    if isinstance(turns, str):
        turns = (Turn("user", turns),)
    text = template_text(tokenizer, turns, generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class TokenCount:
    total: int  # tokens of the whole conversation, as `render` gives them
    prompt: int  # of them, before the last assistant turn


def count_tokens(tokenizer: PreTrainedTokenizerBase, rendered: Sequence[RenderedText]) -> list[TokenCount]:
    """`render`'s lengths for many conversations at once, through the fast tokenizer's batch API (in Rust,
    on every core): what validation measures, without building the ids and labels."""
    special = _special_ids(tokenizer)
    encodings = _counting_backend(tokenizer).encode_batch([r.text for r in rendered], add_special_tokens=False)
    counts = []
    for text, encoding in zip(rendered, encodings, strict=True):
        length = len(encoding)
        before = after = 0  # EOS that `render` appends to answers closed by no special token
        ids = encoding.ids if text.answers else []
        for (start, _), (first, last) in zip(text.answers, _answer_tokens(encoding, text, length), strict=True):
            if not special.intersection(ids[first:last]):
                before, after = (before + 1, after) if start < text.last_answer else (before, after + 1)
        prompt = _token_at(encoding, text.last_answer, len(text.text), length)
        counts.append(TokenCount(total=length + before + after, prompt=prompt + before))
    return counts


_COUNTING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _counting_backend(tokenizer: PreTrainedTokenizerBase):
    """The fast tokenizer's Rust backend, copied without padding or truncation (a saved tokenizer may carry
    padding, which would make every row of a batch as long as the longest): counting needs each row's own
    length, and a copy leaves the shared tokenizer's state to whoever else uses it meanwhile."""
    key = (id(tokenizer.backend_tokenizer), len(tokenizer))  # tokens added since: a new copy
    known = _COUNTING.get(tokenizer)
    if known is None or known[0] != key:
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.no_truncation()
        known = _COUNTING[tokenizer] = (key, backend)
    return known[1]


def _token_at(encoding, char: int, text_length: int, length: int, look_ahead: int = 64) -> int:
    """The token holding character `char`, or the next one when no token holds it (whitespace a tokenizer
    trims from its offsets); past the end of the text, `length` (the number of tokens)."""
    for position in range(char, min(char + look_ahead, text_length)):
        token = encoding.char_to_token(position)
        if token is not None:
            return token
    return length


_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the template closes an assistant turn with (`<|im_end|>`, `<end_of_turn>`,
    `<|eot_id|>`, `<|end|>`, EOS): generation stops at them, as training taught it to."""
    key = (tokenizer.chat_template, len(tokenizer))
    known = _END_OF_TURN.get(tokenizer)
    if known and known[0] == key:
        return known[1]
    probe = Conversation((Turn("user", "Hi"), Turn("assistant", "Hello")))
    try:
        ids, labels = render(tokenizer, probe)
    except TemplateRefused:
        found: list[int] = []
    else:
        special = _special_ids(tokenizer)
        found = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX and i in special]
    found = list(dict.fromkeys([*found, tokenizer.eos_token_id]))
    _END_OF_TURN[tokenizer] = (key, found)
    return found
