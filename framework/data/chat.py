"""Chat (SFT) data: conversations rendered by a jinja chat template into token ids with a loss
mask that is 1 exactly on the assistant's turns.

Records are {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}.
The mask comes from prefix rendering: for every assistant turn i the template renders
messages[:i] with the generation prompt and messages[:i + 1]; the assistant piece is the
difference (its content and the template's end-of-turn text). Each piece is tokenized on its own,
so a mask boundary never falls inside a token. Templates run in jinja2's immutable sandbox, as
transformers' apply_chat_template runs them (tokenizer files carry untrusted template code).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from framework.data.tokenizers import Tokenizer, token_dtype
from framework.errors import DataError

ROLES = ("system", "user", "assistant")

# ChatML, as Qwen and transformers' former default template write it.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Llama 3 instruct: header tokens around the role, <|eot_id|> ends a turn, BOS once at the start.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
# Plain text, for the byte tokenizer: no special tokens, a newline ends each turn.
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '\\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "plain": PLAIN}
# tokenizer_config.json entries handed to templates as variables (when they are strings).
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)


@dataclass
class ChatTemplate:
    """A compiled chat template: `name` for messages, `source` the jinja text, `variables` the
    special-token strings it may use (bos_token, eos_token, ...)."""

    name: str
    source: str
    variables: dict[str, str] = field(default_factory=dict)
    _compiled: Any = field(default=None, repr=False)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> str:
        """The template's text for `messages` (DataError if the template fails)."""
        try:
            return self._compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self.variables,
            )
        except Exception as e:  # jinja2 errors, raise_exception(), type errors inside templates
            raise DataError(f"chat template {self.name!r} failed: {e}") from e


def _environment():
    """A sandboxed jinja2 environment with the options and globals chat templates expect."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """Accept transformers' {% generation %} ... {% endgeneration %} (rendered as is)."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; chat templates want plain JSON
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token, eos_token, ... strings from the tokenizer's tokenizer_config.json ('' for
    bos_token/eos_token when it has none, so templates that print them still render)."""
    config = getattr(tokenizer, "config", None) or {}
    out = {"bos_token": "", "eos_token": ""}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def _own_template(tokenizer: Tokenizer) -> tuple[str, str] | None:
    """(name, source) of the tokenizer's own chat template: tokenizer_config.json's
    chat_template (a string, or a list of named templates: "default"), else a
    chat_template.jinja beside the tokenizer file (as newer transformers save it)."""
    config = getattr(tokenizer, "config", None) or {}
    where = f"tokenizer {tokenizer.name}"
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
        if source is None:
            raise DataError(
                f"{where}: chat_template lists templates {sorted(map(str, named))} but none "
                "named 'default': set data.chat_template to a built-in name or a .jinja file"
            )
    if isinstance(source, str):
        return where, source
    if tokenizer.name != "byte":
        beside = Path(tokenizer.name).parent / "chat_template.jinja"
        if beside.is_file():
            return str(beside), beside.read_text(encoding="utf-8")
    return None


def load_chat_template(tokenizer: Tokenizer, name: str | None = None) -> ChatTemplate:
    """A chat template by name: None/"auto" (the tokenizer's own, else "chatml"), a built-in
    ("chatml", "llama3", "plain") or a path to a .jinja file."""
    if name is None or name == "auto":
        own = _own_template(tokenizer)
        label, source = own if own is not None else ("chatml", CHATML)
    elif name in BUILTIN_TEMPLATES:
        label, source = name, BUILTIN_TEMPLATES[name]
    elif Path(name).is_file():
        try:
            label, source = name, Path(name).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"chat template file {name!r} is not UTF-8 text: {e}") from e
    else:
        raise DataError(
            f"chat template {name!r} is neither 'auto', a built-in "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a template file"
        )
    import jinja2

    try:
        compiled = _environment().from_string(source)
    except jinja2.TemplateError as e:
        raise DataError(f"chat template {label!r} is not valid jinja: {e}") from e
    return ChatTemplate(label, source, _special_tokens(tokenizer), compiled)


def _where(where: str | None, index: int | None) -> str:
    parts = [p for p in (where, None if index is None else f"record {index}") if p]
    return ": ".join(parts) or "conversation"


def validate_messages(messages: Any, label: str = "conversation") -> list[dict]:
    """The messages of one conversation, checked (DataError naming `label` and the message)."""
    if not isinstance(messages, list):
        raise DataError(
            f"{label}: 'messages' must be a list of messages, got {type(messages).__name__}"
        )
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{label}: message {j} is not an object")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                what = "has no" if key not in m else "has a non-string"
                raise DataError(f"{label}: message {j} {what} {key!r}")
        if m["role"] not in ROLES:
            raise DataError(
                f"{label}: message {j} has unknown role {m['role']!r} (expected {', '.join(ROLES)})"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{label}: no assistant turn, nothing to train on")
    return messages


def _extension(before: str, after: str, template: ChatTemplate, label: str, turn: int) -> str:
    """`after` minus its prefix `before` (DataError if the template is not prefix-stable)."""
    if not after.startswith(before):
        raise DataError(
            f"chat template {template.name!r} is not prefix-stable at {label}, message {turn}: "
            "rendering the conversation up to that turn is not a prefix of rendering it with "
            "the turn, so assistant tokens cannot be masked; use another template"
        )
    return after[len(before) :]


def chat_pieces(
    messages: Sequence[Mapping[str, Any]], template: ChatTemplate, label: str = "conversation"
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces whose concatenation is the
    template's rendering of all messages."""
    pieces: list[tuple[str, bool]] = []
    done = ""  # rendered text covered by pieces so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prompt = template.render(messages[:i], add_generation_prompt=True)
            turn = template.render(messages[: i + 1])
        except DataError as e:
            raise DataError(f"{label}: {e}") from e
        pieces.append((_extension(done, prompt, template, label, i), False))
        pieces.append((_extension(prompt, turn, template, label, i), True))
        done = turn
    try:
        full = template.render(messages)
    except DataError as e:
        raise DataError(f"{label}: {e}") from e
    pieces.append((_extension(done, full, template, label, len(messages) - 1), False))
    return [(text, assistant) for text, assistant in pieces if text]


def encode_chat(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    *,
    where: str | None = None,
    index: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, uint8 loss mask) of one conversation without the trailing EOS; the mask is 1
    exactly on the assistant turns' tokens (content and end-of-turn text)."""
    label = _where(where, index)
    messages = validate_messages(messages, label)
    ids: list[int] = []
    mask: list[int] = []
    for text, assistant in chat_pieces(messages, template, label):
        tokens = tokenizer.encode_special(text)
        ids.extend(tokens)
        mask.extend([int(assistant)] * len(tokens))
    return np.array(ids, token_dtype(tokenizer.vocab_size)), np.array(mask, np.uint8)


def encode_chats(
    records: Iterable[Any],
    tokenizer: Tokenizer,
    template: ChatTemplate,
    *,
    where: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(token stream, uint8 loss mask) of many conversations, each followed by the tokenizer's
    EOS (mask 1 on it when the conversation ends with an assistant turn). A conversation that
    contains the EOS itself is refused: the loader starts a new document after every EOS."""
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], token_dtype(tokenizer.vocab_size))
    for index, record in enumerate(records):
        label = _where(where, index)
        if not isinstance(record, dict) or "messages" not in record:
            raise DataError(f"{label}: not an object with a 'messages' list")
        t, m = encode_chat(record["messages"], tokenizer, template, where=where, index=index)
        if np.any(t == tokenizer.eos_id):
            raise DataError(
                f"{label}: the rendered conversation contains the EOS token (id "
                f"{tokenizer.eos_id}) that separates documents, so training would cut it apart "
                f"(chat template {template.name!r} ends turns with it, or a message contains its "
                "text): set data.eos_token to an end-of-text token the template does not write"
            )
        last_is_assistant = record["messages"][-1]["role"] == "assistant"
        ids += [t, eos]
        masks += [m, np.array([last_is_assistant], np.uint8)]
    if not ids:
        return np.zeros(0, token_dtype(tokenizer.vocab_size)), np.zeros(0, np.uint8)
    return np.concatenate(ids), np.concatenate(masks)
