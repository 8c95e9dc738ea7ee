"""Chat templates rendered as transformers renders them, and assistant-only loss masks.

    from lib.text import chat
    text = chat.render(messages, template, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    ids, mask = chat.assistant_mask(tokenizer, messages)     # mask[i] = 1: token i is an assistant token

Rendering copies transformers' ``render_jinja_template`` (``utils/chat_template_utils.py``): a
jinja2 ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, ``raise_exception`` (a ``jinja2.TemplateError``), ``strftime_now``, a
``tojson`` filter that does not escape HTML (``json.dumps(x, ensure_ascii=False, ...)``), and the
``{% generation %}`` tag accepted (rendered as its body). Template variables: ``messages``,
``tools``, ``documents``, ``add_generation_prompt`` and what the caller passes (transformers passes
the tokenizer's special tokens: ``bos_token``, ``eos_token``, ...).

Loss masks come from rendering prefixes, never from ``{% generation %}`` tags (stock templates have
none, and transformers then silently returns an all-zero mask). For assistant message ``i``:

* its span starts at the end of ``render(messages[:i], add_generation_prompt=True)`` (so the
  assistant header the template writes is prompt, not target), and
* ends at the end of ``render(messages[:i + 1])`` (so the end-of-turn token the template writes
  after the content, e.g. ``</s>`` or ``<|im_end|>``, is a target: the model must learn to stop);

both renders must be prefixes of the full render (:class:`TemplateMismatchError` otherwise: a
template that rewrites earlier turns, e.g. by dropping reasoning, cannot be masked this way). The
full text is tokenised once, with character offsets, and a token is an assistant token when its
characters overlap a span. The mask is asserted non-empty (:class:`EmptyMaskError`).

Records that cannot be used raise a subclass of :class:`ChatError` whose ``kind`` the data layer
counts: ``malformed``, ``unknown_role``, ``no_assistant``, ``template_error``, ``template_mismatch``,
``empty_mask``.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from lib.text.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

# The Tulu (open-instruct) template, as in allenai/tulu-2 and the golden llama_tiny_hf tokenizer.
TULU_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}{% else %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")

# ChatML (SmolLM2-Instruct, Qwen): <|im_start|>role\ncontent<|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class ChatError(ValueError):
    """A chat record that cannot be used for training; ``kind`` names the reason (counted by the data layer)."""

    kind = "chat_error"


class MalformedMessagesError(ChatError):
    """Not a list of ``{"role": str, "content": str}`` dicts."""

    kind = "malformed"


class UnknownRoleError(ChatError):
    """A message whose role is not one of the accepted roles."""

    kind = "unknown_role"


class NoAssistantError(ChatError):
    """No assistant message: nothing to train on."""

    kind = "no_assistant"


class ChatTemplateError(ChatError):
    """The template raised (``raise_exception``, or a jinja error) on this record."""

    kind = "template_error"


class TemplateMismatchError(ChatError):
    """A prefix render is not a prefix of the full render (the template rewrites earlier turns)."""

    kind = "template_mismatch"


class EmptyMaskError(ChatError):
    """The assistant spans hold no token (e.g. empty assistant messages under a template that writes no end token)."""

    kind = "empty_mask"


class _GenerationTag(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` and renders the body (masks never use it)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: jinja's own tojson escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_template(chat_template: str) -> jinja2.Template:
    """The compiled template, in transformers' environment (cached per template string)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(chat_template)


def render(messages: Sequence[Mapping[str, Any]], chat_template: str, *, add_generation_prompt: bool = False,
           tools: Sequence[Mapping[str, Any]] | None = None, documents: Sequence[Mapping[str, Any]] | None = None,
           **kwargs: Any) -> str:
    """The text transformers' ``apply_chat_template(..., tokenize=False)`` renders. ``kwargs`` are
    further template variables (``bos_token``, ``eos_token``, ``date_string``, ...). A template's
    ``raise_exception`` raises ``jinja2.TemplateError``, as in transformers."""
    return compile_template(chat_template).render(messages=list(messages), tools=tools, documents=documents,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)


def check_messages(messages: Any, *, roles: Sequence[str] = ROLES) -> None:
    """Raise a :class:`ChatError` for a conversation that cannot be trained on: not a list of
    role/content dicts (``malformed``), a role outside ``roles`` (``unknown_role``), no assistant
    message (``no_assistant``)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise MalformedMessagesError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, "
                                     f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise MalformedMessagesError(f"message {i} is not a {{'role', 'content'}} dict: {str(m)[:80]!r}")
        if m["role"] not in roles:
            raise UnknownRoleError(f"message {i} has role {m['role']!r}; accepted roles: {tuple(roles)}")
        if not isinstance(m["content"], str):
            raise MalformedMessagesError(f"message {i} content is {type(m['content']).__name__}, not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise NoAssistantError("the conversation has no assistant message (nothing to train on)")


def assistant_spans(messages: Sequence[Mapping[str, Any]], chat_template: str, *, last_only: bool = False,
                    roles: Sequence[str] = ROLES, **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """The full render of ``messages`` and the character spans ``[start, end)`` of its assistant
    turns, found by rendering prefixes (module docstring). ``last_only``: only the final assistant
    turn. ``kwargs``: template variables (the special tokens). Raises a :class:`ChatError`."""
    check_messages(messages, roles=roles)
    messages = list(messages)

    def _render(msgs, gen):
        try:
            return render(msgs, chat_template, add_generation_prompt=gen, **kwargs)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on this record: {e}") from e

    full = _render(messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_only:
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = _render(messages[:i], True) if i else _render([], True)
        upto = full if i == len(messages) - 1 else _render(messages[:i + 1], False)
        for name, prefix in (("before", before), ("through", upto)):
            if not full.startswith(prefix):
                at = next((k for k, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
                raise TemplateMismatchError(
                    f"rendering the messages {name} assistant turn {i} is not a prefix of the whole conversation's "
                    f"render (they differ at character {at}: {prefix[at:at + 30]!r} vs {full[at:at + 30]!r}); this "
                    f"template rewrites earlier turns, so prefix-rendered masks are not possible")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def spans_to_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """uint8 ``[n]``: 1 for tokens whose character span ``offsets[i] = (a, b)`` overlaps a span
    (a zero-width token counts when ``a`` lies inside it)."""
    offsets = np.asarray(offsets).reshape(-1, 2)
    a, b = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), bool)
    for s, e in spans:
        mask |= ((a < e) & (b > s)) | ((a == b) & (a >= s) & (a < e))
    return mask.astype(np.uint8)


def assistant_masks(tokenizer: Tokenizer, conversations: Sequence[Any], *, chat_template: str | None = None,
                    last_only: bool = False, roles: Sequence[str] = ROLES, **kwargs: Any
                    ) -> list[tuple[np.ndarray, np.ndarray] | ChatError]:
    """:func:`assistant_mask` over many conversations (one batched tokeniser call). A conversation
    that cannot be used gives its :class:`ChatError` in place of the result (not raised)."""
    template = tokenizer._template(chat_template)
    variables = {**tokenizer.special_tokens_map, **kwargs}
    rendered: list[tuple[str, list] | ChatError] = []
    for messages in conversations:
        try:
            rendered.append(assistant_spans(messages, template, last_only=last_only, roles=roles, **variables))
        except ChatError as e:
            rendered.append(e)
    texts = [r[0] for r in rendered if not isinstance(r, ChatError)]
    encoded = iter(tokenizer.encode_with_offsets(texts, add_special_tokens=False))
    out: list[tuple[np.ndarray, np.ndarray] | ChatError] = []
    for r in rendered:
        if isinstance(r, ChatError):
            out.append(r)
            continue
        ids, offsets = next(encoded)
        mask = spans_to_mask(offsets, r[1])
        out.append((ids, mask) if mask.any() else EmptyMaskError(
            f"no token falls in the assistant spans {r[1]} of a {len(ids)}-token conversation"))
    return out


def assistant_mask(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, chat_template: str | None = None,
                   last_only: bool = False, roles: Sequence[str] = ROLES, **kwargs: Any
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 ``[n]`` of the rendered conversation (encoded without special tokens, as
    transformers' ``apply_chat_template(tokenize=True)``) and a uint8 ``[n]`` mask, 1 on the
    tokens of assistant turns (their content and end-of-turn token, not the assistant header).
    Shift it by one for a next-token loss (``loss_mask[t] = mask[t + 1]``). Raises a
    :class:`ChatError` (module docstring); the mask is never all zeros."""
    (result,) = assistant_masks(tokenizer, [messages], chat_template=chat_template, last_only=last_only,
                                roles=roles, **kwargs)
    if isinstance(result, ChatError):
        raise result
    return result
