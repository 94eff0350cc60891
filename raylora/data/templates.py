"""Chat templates and conversation tokenization with image-token expansion (any model family).

A template is the MPT separator style of the ChatML-like formats VLMs use: ``system + sep``, then per turn
``role + message + sep``; the generation prompt ends with the assistant role. Each piece is
tokenized on its own and concatenated, so the label mask is exact by construction (no
"tokenization mismatch" and no silently zeroed samples). Labels are -100 everywhere except the
assistant answers and their end-of-turn token (the separator without the newline after it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ImageTokens:
    """How a family spells one image in the token stream: ``start`` + ``context`` x (units x
    ``tokens_per_unit``) + ``end``; ``after_image`` is what follows an image placeholder's newline
    in the family's own chat template ("\n" where it keeps the newline, "" where the text follows
    the image directly); ``jinja_item`` is how a saved chat template renders an image item."""

    start: str
    context: str
    end: str
    tokens_per_unit: int = 1
    after_image: str = "\n"
    jinja_item: str = ""


@dataclass(frozen=True)
class ChatTemplate:
    """A ChatML/MPT-style chat format: ``system + sep`` (left out when there is no system message and
    no default), then per turn ``role + message + sep``; the generation prompt ends with the
    assistant role."""

    name: str
    system_template: str
    user_role: str
    assistant_role: str
    sep: str
    default_system: str | None
    stop_strings: tuple[str, ...]

    def system_text(self, system_message: str | None) -> str:
        msg = self.default_system if system_message is None else system_message
        if msg is None:
            return ""
        return self.system_template.format(system=msg) + self.sep

    def jinja(self, system_message: str | None = None, image_item: str = "<image>\n") -> str:
        """The same format as a Hugging Face ``chat_template`` (for saved tokenizers/processors).

        Image items render as ``image_item``, which the family's transformers processor expands.
        """

        def lit(text: str) -> str:
            return "{{ " + json.dumps(text) + " }}"

        msg = self.default_system if system_message is None else system_message
        system = "none" if msg is None else json.dumps(msg)
        start = self.system_template.split("{system}")[0]
        return (
            "{% set sys = " + system + " %}"
            "{% if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% endif %}"
            "{% if sys is not none %}" + lit(start) + "{{ sys }}" + lit(self.sep) + "{% endif %}"
            "{% for m in messages %}{% if m['role'] != 'system' %}"
            "{% if m['role'] == 'user' %}"
            + lit(self.user_role)
            + "{% else %}"
            + lit(self.assistant_role)
            + "{% endif %}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            + lit(image_item)
            + "{% elif c['type'] == 'text' %}"
            "{{ c['text'] }}{% endif %}{% endfor %}"
            "{% endif %}" + lit(self.sep) + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + lit(self.assistant_role) + "{% endif %}"
        )


_MARK = ("\x01SYSTEM\x01", "\x01USER\x01", "\x01ANSWER\x01")


def template_from_jinja(jinja: str, name: str, stop_strings: tuple[str, ...] = ()) -> ChatTemplate:
    """The :class:`ChatTemplate` a checkpoint's Hugging Face ``chat_template`` renders, found by
    rendering marker messages: a system, a user and an assistant turn, and the generation prompt.
    Raises ValueError when the template is not of that shape (roles, a separator after each turn)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # as transformers renders chat templates
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    tpl = env.from_string(jinja)
    sys_m, usr_m, ans_m = _MARK

    def render(messages: list[dict[str, Any]], generation: bool) -> str:
        return tpl.render(messages=messages, add_generation_prompt=generation, tools=None)

    user, system = {"role": "user", "content": usr_m}, {"role": "system", "content": sys_m}
    full = render([system, user, {"role": "assistant", "content": ans_m}], False)
    prompt = render([system, user], True)
    bare = render([user], True)
    try:
        head, rest = full.split(sys_m)
        between, rest = rest.split(usr_m)
        _, sep = rest.split(ans_m)
        if not prompt.startswith(head + sys_m + between + usr_m + sep):
            raise ValueError("the generation prompt does not follow the user turn's separator")
        assistant_role = prompt[len(head + sys_m + between + usr_m + sep) :]
        if not between.startswith(sep) or not sep:
            raise ValueError("no separator between turns")
        user_role = between[len(sep) :]
        default_head = bare.split(usr_m)[0][: -len(user_role)] if user_role else bare.split(usr_m)[0]
    except ValueError as e:
        raise ValueError(
            f"{name}: chat template not of the system/user/assistant + separator shape ({e})"
        ) from None
    default_system = None
    if default_head:
        if not (default_head.startswith(head) and default_head.endswith(sep)):
            raise ValueError(f"{name}: cannot read the chat template's default system message")
        default_system = default_head[len(head) : -len(sep)]
    stops = stop_strings or (sep.strip() or sep,)
    return ChatTemplate(name, head + "{system}", user_role, assistant_role, sep, default_system, stops)


class RowRejected(ValueError):
    """A row that cannot be used; ``reason`` is a short key counted in reports."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConversationTokenizer:
    """Turns (conversation, image units per image) into input_ids + labels for one template.

    An image of ``n`` units becomes ``image.start`` + ``image.context`` x (n x
    ``image.tokens_per_unit``) + ``image.end``: InternVL's tiles of 256 tokens, Qwen-VL's merged
    patches of one token each (see :mod:`raylora.families`).
    """

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate,
        image: ImageTokens,
        max_seq_length: int = 4096,
        system_message: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.image = image
        self.tokens_per_tile = image.tokens_per_unit
        self.max_seq_length = max_seq_length
        self.system_message = system_message
        ids = tokenizer.convert_tokens_to_ids([image.start, image.end, image.context])
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ValueError(f"tokenizer lacks the image tokens {image.start}, {image.end}, {image.context}")
        self.img_start_id, self.img_end_id, self.image_context_id = ids
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        if text in self._cache:
            return self._cache[text]
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        if len(self._cache) < 64 and len(text) < 512:
            self._cache[text] = ids  # template pieces and prompts repeat on every row
        return ids

    def _encode_with_images(self, text: str, at: list[int], offset: int) -> list[int]:
        """Tokens of a text with ``<image>`` placeholders: each image as its start and end tokens; the
        position of its context run (relative to ``offset``, where the text starts) appended to ``at``."""
        parts = text.split(IMAGE_PLACEHOLDER)
        ids = list(self._encode(parts[0]))
        for part in parts[1:]:
            if part.startswith("\n"):  # the family's own template may join the text to the image
                part = self.image.after_image + part[1:]
            ids.append(self.img_start_id)
            at.append(offset + len(ids))
            ids.append(self.img_end_id)
            ids += self._encode(part)
        return ids

    def encode_text(self, conversations: list[dict[str, str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A training conversation tokenized once, without its images' context runs: input_ids,
        labels (-100 but for the answers and their end-of-turn tokens) and ``image_at``, where each
        image's run goes. What the data check keeps per row; :meth:`expand` makes the model's tokens."""
        t = self.template
        system = self.system_message
        turns = conversations
        if turns and turns[0]["from"] == "system":
            system, turns = turns[0]["value"], turns[1:]
        ids: list[int] = list(self._encode(t.system_text(system)))
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        at: list[int] = []
        for turn in turns:
            if turn["from"] == "human":
                role = self._encode(t.user_role)
                body = self._encode_with_images(turn["value"], at, len(ids) + len(role))
                piece = role + body + self._encode(t.sep)
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
            else:
                role = self._encode(t.assistant_role)
                end = t.sep.rstrip()  # the end-of-turn token is learnt, the newline after it is not
                answer = self._encode(turn["value"]) + self._encode(end or t.sep)
                tail = self._encode(t.sep[len(end) :]) if end else []
                ids += role + answer + tail
                labels += [IGNORE_INDEX] * len(role) + answer + [IGNORE_INDEX] * len(tail)
        return np.asarray(ids, np.int64), np.asarray(labels, np.int64), np.asarray(at, np.int64)

    def expanded_length(self, ids_length: int, tiles: list[int]) -> int:
        """Tokens of a row once its images are expanded; RowRejected (too_long) above max_seq_length."""
        image_tokens = sum(tiles) * self.tokens_per_tile
        length = ids_length + image_tokens
        if length > self.max_seq_length:
            raise RowRejected(
                "too_long",
                f"{length} tokens ({image_tokens} of them image tokens) > max_seq_length "
                f"{self.max_seq_length}; raise model.max_seq_length or use fewer image tokens (data.max_num "
                "tiles, or data.max_pixels)",
            )
        return length

    def expand(
        self, ids: np.ndarray, labels: np.ndarray, image_at: np.ndarray, tiles: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The model's input_ids and labels: each image's context run (units x tokens per unit)
        inserted at its ``image_at``. Raises RowRejected when the row is longer than max_seq_length
        (image tokens are never truncated)."""
        self.expanded_length(len(ids), tiles)
        if len(image_at) != len(tiles):
            raise ValueError(f"{len(image_at)} images in the tokens, {len(tiles)} given")
        runs = np.repeat(np.asarray(image_at, np.int64), np.asarray(tiles, np.int64) * self.tokens_per_tile)
        return (
            np.insert(np.asarray(ids, np.int64), runs, self.image_context_id),
            np.insert(np.asarray(labels, np.int64), runs, IGNORE_INDEX),
        )

    def encode_conversation(
        self, conversations: list[dict[str, str]], tiles: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and labels (int64 arrays) of a training conversation, images expanded
        (:meth:`encode_text` then :meth:`expand`)."""
        return self.expand(*self.encode_text(conversations), tiles)

    def encode_prompt(self, prompt: str, tiles: list[int]) -> np.ndarray:
        """input_ids of a generation prompt: system, the user turn with the image, assistant role."""
        t = self.template
        if IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER * len(tiles) + "\n" + prompt if tiles else prompt
        head = self._encode(t.system_text(self.system_message)) + self._encode(t.user_role)
        at: list[int] = []
        ids = head + self._encode_with_images(prompt, at, len(head))
        ids += self._encode(t.sep) + self._encode(t.assistant_role)
        runs = np.repeat(np.asarray(at, np.int64), np.asarray(tiles, np.int64) * self.tokens_per_tile)
        return np.insert(np.asarray(ids, np.int64), runs, self.image_context_id)

    def stop_token_ids(self) -> list[int]:
        """Token ids that end generation: the template's separators plus the tokenizer's eos."""
        out = []
        for s in self.template.stop_strings:
            ids = self.tokenizer.encode(s.strip() or s, add_special_tokens=False)
            if len(ids) == 1:
                out.append(ids[0])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            out.append(eos)
        return sorted(set(out))
