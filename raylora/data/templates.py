"""InternVL2 chat templates and conversation tokenization with image-token expansion.

Every template here is InternVL's MPT separator style: ``system + sep``, then per turn
``role + message + sep``; the generation prompt ends with the assistant role. Each piece is
tokenized on its own and concatenated, so the label mask is exact by construction (no
"tokenization mismatch" and no silently zeroed samples). Labels are -100 everywhere except the
assistant answers and their end separator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100

INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system_template: str
    user_role: str
    assistant_role: str
    sep: str
    default_system: str
    stop_strings: tuple[str, ...]

    def system_text(self, system_message: str | None) -> str:
        msg = self.default_system if system_message is None else system_message
        return self.system_template.format(system=msg) + self.sep

    def jinja(self, system_message: str | None = None) -> str:
        """The same format as a Hugging Face ``chat_template`` (for saved tokenizers/processors).

        Image items render as ``<IMG_CONTEXT>``, which transformers' InternVL processor expands.
        """

        def lit(text: str) -> str:
            return "{{ " + json.dumps(text) + " }}"

        system = json.dumps(self.default_system if system_message is None else system_message)
        start = self.system_template.split("{system}")[0]
        return (
            "{% set sys = " + system + " %}"
            "{% if messages and messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% endif %}"
            + lit(start)
            + "{{ sys }}"
            + lit(self.sep)
            + "{% for m in messages %}{% if m['role'] != 'system' %}"
            "{% if m['role'] == 'user' %}"
            + lit(self.user_role)
            + "{% else %}"
            + lit(self.assistant_role)
            + "{% endif %}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
            + lit("<IMG_CONTEXT>\n")
            + "{% elif c['type'] == 'text' %}"
            "{{ c['text'] }}{% endif %}{% endfor %}"
            "{% endif %}" + lit(self.sep) + "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + lit(self.assistant_role) + "{% endif %}"
        )


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "internlm2-chat",
            "<|im_start|>system\n{system}",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>",
            INTERNVL2_SYSTEM,
            ("<|im_end|>",),
        ),
        ChatTemplate(
            "Hermes-2",
            "<|im_start|>system\n{system}",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>",
            INTERNVL2_SYSTEM,
            ("<|im_end|>", "<|endoftext|>"),
        ),
        ChatTemplate(
            "phi3-chat",
            "<|system|>\n{system}",
            "<|user|>\n",
            "<|assistant|>\n",
            "<|end|>",
            INTERNVL2_SYSTEM,
            ("<|end|>", "<|endoftext|>"),
        ),
        ChatTemplate(
            "internvl2_5",
            "<|im_start|>system\n{system}",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "<|im_end|>\n",
            INTERNVL2_5_SYSTEM,
            ("<|im_end|>",),
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; valid: {', '.join(TEMPLATES)}") from None


class RowRejected(ValueError):
    """A row that cannot be used; ``reason`` is a short key counted in reports."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConversationTokenizer:
    """Turns (conversation, tiles per image) into input_ids + labels for one template.

    ``tokens_per_tile`` is (image_size / patch_size)^2 * downsample_ratio^2: 256 for InternVL2.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str | ChatTemplate,
        tokens_per_tile: int = 256,
        max_seq_length: int = 4096,
        system_message: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.tokens_per_tile = tokens_per_tile
        self.max_seq_length = max_seq_length
        self.system_message = system_message
        ids = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, IMG_CONTEXT])
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or (unk is not None and i == unk) for i in ids):
            raise ValueError(
                f"tokenizer lacks the InternVL image tokens {IMG_START}, {IMG_END}, {IMG_CONTEXT}"
            )
        self.img_start_id, self.img_end_id, self.img_context_id = ids
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        if text in self._cache:
            return self._cache[text]
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        if len(self._cache) < 64 and len(text) < 512:
            self._cache[text] = ids  # template pieces and prompts repeat on every row
        return ids

    def _encode_with_images(self, text: str, tiles: list[int], next_image: int) -> tuple[list[int], int]:
        parts = text.split(IMAGE_PLACEHOLDER)
        ids = self._encode(parts[0])
        for part in parts[1:]:
            n = tiles[next_image]
            ids = (
                ids
                + [self.img_start_id]
                + [self.img_context_id] * (n * self.tokens_per_tile)
                + [self.img_end_id]
            )
            next_image += 1
            ids = ids + self._encode(part)
        return ids, next_image

    def encode_conversation(
        self, conversations: list[dict[str, str]], tiles: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and labels (int64 arrays) of a training conversation.

        Raises RowRejected when the text does not fit ``max_seq_length`` once image tokens are
        expanded (image tokens are never truncated).
        """
        t = self.template
        system = self.system_message
        turns = conversations
        if turns and turns[0]["from"] == "system":
            system, turns = turns[0]["value"], turns[1:]
        ids: list[int] = list(self._encode(t.system_text(system)))
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        next_image = 0
        for turn in turns:
            if turn["from"] == "human":
                body, next_image = self._encode_with_images(turn["value"], tiles, next_image)
                piece = self._encode(t.user_role) + body + self._encode(t.sep)
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
            else:
                role = self._encode(t.assistant_role)
                answer = self._encode(turn["value"]) + self._encode(t.sep)
                ids += role + answer
                labels += [IGNORE_INDEX] * len(role) + answer
        if len(ids) > self.max_seq_length:
            raise RowRejected(
                "too_long",
                f"{len(ids)} tokens with {sum(tiles)} tiles ({sum(tiles) * self.tokens_per_tile} image tokens) "
                f"> max_seq_length {self.max_seq_length}; raise model.max_seq_length or lower data.max_num",
            )
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)

    def encode_prompt(self, prompt: str, tiles: list[int]) -> np.ndarray:
        """input_ids of a generation prompt: system, the user turn with the image, assistant role."""
        t = self.template
        if IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER * len(tiles) + "\n" + prompt if tiles else prompt
        body, _ = self._encode_with_images(prompt, tiles, 0)
        ids = self._encode(t.system_text(self.system_message)) + self._encode(t.user_role) + body
        ids += self._encode(t.sep) + self._encode(t.assistant_role)
        return np.asarray(ids, dtype=np.int64)

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
