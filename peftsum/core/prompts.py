"""How a document and its summary become tokens, in one of two prompt formats (`data.format`).

- **plain**: `data.template` with the document inserted (default "{document}\\nTL;DR:"), the summary after a space,
  then EOS: how a base model, which has no chat template, is prompted.
- **chat**: the tokenizer's own chat template (`apply_chat_template`): an optional system turn (`data.system`), a
  user turn holding `data.instruction` and the document, then the generation prompt; the target is the summary
  followed by the template's end of turn (`<|im_end|>` in ChatML): how an instruct model was trained to be asked.
- **auto** (the default): chat when the tokenizer has a chat template, else plain.

Either way only the document is ever truncated, so every example fits `max_length`: in the chat format the whole
prompt is tokenized as `apply_chat_template` tokenizes it, and the document's own tokens (found by their character
offsets) are the only ones dropped, never the template around them. Labels are IGNORE on the prompt, so the loss
covers the summary and its end (EOS, or the end of turn) alone; generation stops at either (`stop_ids`).
Everything here is a pure function of (tokenizer, text, settings).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import DataConfig
from ..errors import UserError
from .data import Example, data_kind

IGNORE = -100
FORMATS = ("plain", "chat", "auto")
SHOT_SEPARATOR = "\n\n"  # between the worked examples of a plain few-shot prompt


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt; summary tokens and their end (EOS / end of turn) otherwise

    @property
    def prompt_length(self) -> int:
        return sum(1 for label in self.labels if label == IGNORE)


def prompt_budget(cfg: DataConfig, reserved: int = 0, end_tokens: int = 1) -> int:
    """Tokens a generation prompt may take: what training gave it when the summary is at its cap (plus its
    `end_tokens`: EOS, or the chat template's end of turn)."""
    return cfg.max_length - reserved - (cfg.max_summary_tokens + end_tokens)


# ---------------------------------------------------------------- plain: the template


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] for tokenizers whose models expect it (Llama-2 style), else nothing (GPT-2, SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos]:
        return [bos]
    return []


def encode_prompt(tokenizer, document: str, template: str, budget: int) -> list[int]:
    """Template with the document inserted, the document truncated so the whole prompt fits `budget` tokens."""
    prefix, suffix = template.split("{document}", 1)
    head = bos_prefix(tokenizer) + (tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else [])
    tail = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    room = budget - len(head) - len(tail)
    if room < 1:
        raise UserError(f"the prompt template alone takes {len(head) + len(tail)} tokens, leaving no room for the "
                        f"document within {budget}; raise data.max_length or shorten data.template")
    document_ids = tokenizer(document, add_special_tokens=False)["input_ids"][:room]
    return head + document_ids + tail


def encode_summary(tokenizer, summary: str, template: str, max_summary_tokens: int) -> list[int]:
    # A space separates a cue like "TL;DR:" from the summary, as BPE tokenizers attach spaces to the next word.
    text = summary if template[-1:].isspace() else " " + summary
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_summary_tokens] + [tokenizer.eos_token_id]


class Format:
    """What both formats share: a training example is the prompt (its document cut to fit) and the target."""

    name: str
    end_tokens: int  # tokens after the summary in a target (EOS, or the end of turn)
    stop_ids: tuple[int, ...]  # generation ends at any of these

    def prompt(self, document: str, budget: int) -> list[int]:
        raise NotImplementedError

    def target(self, summary: str, cap: int) -> list[int]:
        raise NotImplementedError

    def few_shot(self, shots: list[Example], document: str, cfg: DataConfig, budget: int) -> list[int]:
        """A generation prompt holding the worked examples `shots` (each cut as training cuts it) before the
        document (cut to `budget` as a zero-shot prompt is)."""
        raise NotImplementedError

    def example(self, example: Example, cfg: DataConfig, reserved: int = 0) -> Encoded:
        """Prompt + target within cfg.max_length, minus `reserved` slots (virtual tokens)."""
        target = self.target(example.summary, cfg.max_summary_tokens)
        prompt = self.prompt(example.document, cfg.max_length - reserved - len(target))
        return Encoded(prompt + target, [IGNORE] * len(prompt) + target)

    def budget(self, cfg: DataConfig, reserved: int = 0) -> int:
        return prompt_budget(cfg, reserved, self.end_tokens)


class PlainFormat(Format):
    name = "plain"
    end_tokens = 1

    def __init__(self, tokenizer, template: str):
        self.tokenizer, self.template = tokenizer, template
        self.stop_ids = (tokenizer.eos_token_id,)

    def prompt(self, document: str, budget: int) -> list[int]:
        return encode_prompt(self.tokenizer, document, self.template, budget)

    def target(self, summary: str, cap: int) -> list[int]:
        return encode_summary(self.tokenizer, summary, self.template, cap)

    def few_shot(self, shots: list[Example], document: str, cfg: DataConfig, budget: int) -> list[int]:
        # Each worked example as training encodes it, its EOS (which would end the text) replaced by a blank line;
        # the BOS, where the model takes one, only once at the start.
        bos = bos_prefix(self.tokenizer)
        separator = self.tokenizer(SHOT_SEPARATOR, add_special_tokens=False)["input_ids"]
        ids = list(bos)
        for shot in shots:
            encoded = self.example(shot, cfg)
            ids += encoded.input_ids[len(bos):-1] + separator
        return ids + self.prompt(document, budget)[len(bos):]

    def describe(self) -> dict:
        return {"format": self.name, "template": self.template}


# ---------------------------------------------------------------- chat: the tokenizer's own template

# Private-use code points: no real text holds them, and no template changes them (they mark where content goes).
MARK = "\ue000{}\ue001"
MARKS = re.compile("\ue000(\\d+)\ue001")


def has_chat_template(tokenizer) -> bool:
    """Whether `tokenizer` can carry the chat format: a chat template, and character offsets (a fast tokenizer)."""
    return bool(getattr(tokenizer, "chat_template", None)) and bool(getattr(tokenizer, "is_fast", False))


class ChatFormat(Format):
    """The chat format of one tokenizer, instruction and system message."""

    name = "chat"

    def __init__(self, tokenizer, instruction: str, system: str | None):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("data.format chat: this model's tokenizer has no chat template; use data.format plain "
                            "(or auto)")
        if not getattr(tokenizer, "is_fast", False):
            raise UserError("data.format chat needs a fast tokenizer (it finds the document's tokens by their "
                            "character offsets); use data.format plain")
        self.tokenizer, self.instruction, self.system = tokenizer, instruction, system
        self.end_of_turn = self._end_of_turn()
        self.end_tokens = len(self.end_of_turn)
        self.stop_ids = tuple(dict.fromkeys([tokenizer.eos_token_id, self.end_of_turn[-1]]))

    def render(self, turns: list[tuple[str, str]], generation_prompt: bool) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        messages += [{"role": role, "content": content} for role, content in turns]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises its own errors (a template may refuse a system turn, say)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"the model's chat template refused the prompt ({first}); "
                            f"{'leave data.system unset or ' if self.system else ''}use data.format plain") from None

    def _end_of_turn(self) -> list[int]:
        """The tokens the template puts after an assistant's message, up to its first special token (`<|im_end|>`;
        `<end_of_turn>` for Gemma): found by rendering a conversation with a reply against the bare prompt."""
        reply = MARK.format(0)
        asked = [("user", "Hello")]
        prompt = self.render(asked, generation_prompt=True)
        full = self.render(asked + [("assistant", reply)], generation_prompt=False)
        if not full.startswith(prompt) or reply not in full:
            raise UserError("the model's chat template does not render an answer after its generation prompt, so "
                            "peftsum cannot tell where a summary ends; use data.format plain")
        after = self.tokenizer(full[full.index(reply) + len(reply):], add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids) | {
            i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special}
        for position, token in enumerate(after):
            if token in special:
                return after[:position + 1]
        raise UserError("the model's chat template ends an answer with no special token, so generation could not "
                        "stop at the end of the turn; use data.format plain")

    def _user(self, document: str) -> str:
        return f"{self.instruction}\n\n{document}" if self.instruction else document

    def conversation(self, shots: list[tuple[str, str]], document: str) -> tuple[str, list[tuple[int, int]]]:
        """The generation prompt for `document` after the worked examples `shots` (document, summary), as the
        template renders it, and the character span of every inserted text in order (each shot's document and
        summary, then the document)."""
        texts = [text.strip() for shot in shots for text in shot] + [document.strip()]
        turns = []
        for i in range(len(shots)):
            turns += [("user", self._user(MARK.format(2 * i))), ("assistant", MARK.format(2 * i + 1))]
        turns.append(("user", self._user(MARK.format(len(texts) - 1))))
        rendered = self.render(turns, generation_prompt=True)
        pieces, spans, position = [], [None] * len(texts), 0
        for i, piece in enumerate(MARKS.split(rendered)):
            text = texts[int(piece)] if i % 2 else piece  # split() puts the marks' numbers at odd positions
            if i % 2:
                if spans[int(piece)] is not None:
                    raise UserError("the model's chat template repeats a message's content; use data.format plain")
                spans[int(piece)] = (position, position + len(text))
            pieces.append(text)
            position += len(text)
        if None in spans:
            raise UserError("the model's chat template drops or alters a message's content; use data.format plain")
        return "".join(pieces), spans

    def _tokens(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int | None]]:
        """The tokens of `text` exactly as apply_chat_template makes them, and for each the span it starts in."""
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        owners = []
        for start, end in encoded["offset_mapping"]:
            owners.append(next((j for j, (a, b) in enumerate(spans) if a <= start < b and end > start), None))
        return encoded["input_ids"], owners

    @staticmethod
    def _kept(ids: list[int], owners: list[int | None], keep: list[int]) -> list[int]:
        """`ids` without the tokens of span j beyond its first keep[j]."""
        seen = [0] * len(keep)
        out = []
        for token, owner in zip(ids, owners):
            if owner is not None:
                seen[owner] += 1
                if seen[owner] > keep[owner]:
                    continue
            out.append(token)
        return out

    def prompt(self, document: str, budget: int) -> list[int]:
        text, spans = self.conversation([], document)
        ids, owners = self._tokens(text, spans)
        fixed = sum(1 for owner in owners if owner is None)
        if budget - fixed < 1:
            raise UserError(f"the chat template with the instruction takes {fixed} tokens, leaving no room for the "
                            f"document within {budget}; raise data.max_length or shorten data.instruction")
        return self._kept(ids, owners, [budget - fixed])

    def target(self, summary: str, cap: int) -> list[int]:
        return self.tokenizer(summary.strip(), add_special_tokens=False)["input_ids"][:cap] + self.end_of_turn

    def document_tokens(self, document: str, budget: int) -> int:
        """How many of the document's tokens a prompt of `budget` tokens keeps."""
        prompt = self.prompt(document, budget)
        text, spans = self.conversation([], document)
        return len(prompt) - sum(1 for owner in self._tokens(text, spans)[1] if owner is None)

    def few_shot(self, shots: list[Example], document: str, cfg: DataConfig, budget: int) -> list[int]:
        text, spans = self.conversation([(s.document, s.summary) for s in shots], document)
        keep = []
        for shot in shots:  # each worked example cut as training cuts it
            target = self.target(shot.summary, cfg.max_summary_tokens)
            keep += [self.document_tokens(shot.document, cfg.max_length - len(target)), cfg.max_summary_tokens]
        keep.append(self.document_tokens(document, budget))
        ids, owners = self._tokens(text, spans)
        return self._kept(ids, owners, keep)

    def describe(self) -> dict:
        return {"format": self.name, "instruction": self.instruction, "system": self.system,
                "end_of_turn": self.tokenizer.decode(self.end_of_turn)}


# ---------------------------------------------------------------- choosing the format


def resolve_format(tokenizer, cfg: DataConfig) -> str:
    """"plain" or "chat": data.format, with auto meaning chat where the tokenizer has a chat template."""
    if cfg.format != "auto":
        return cfg.format
    return "chat" if has_chat_template(tokenizer) else "plain"


def instruction(cfg: DataConfig) -> str:
    """data.instruction, or (auto) the default of the data set's kind (data.KINDS)."""
    return data_kind(cfg.source).instruction if cfg.instruction == "auto" else cfg.instruction


def prompt_format(tokenizer, cfg: DataConfig, name: str | None = None) -> PlainFormat | ChatFormat:
    """The format a run uses (`name` forces one: "plain" or "chat")."""
    if (name or resolve_format(tokenizer, cfg)) == "plain":
        return PlainFormat(tokenizer, cfg.template)
    return ChatFormat(tokenizer, instruction(cfg), cfg.system)


def encode_example(tokenizer, example: Example, cfg: DataConfig, reserved: int = 0) -> Encoded:
    """One training example in the run's format (see `prompt_format`)."""
    return prompt_format(tokenizer, cfg).example(example, cfg, reserved)


def settle(cfg: DataConfig, fmt: PlainFormat | ChatFormat) -> None:
    """Write the format `fmt` into `cfg` (in place): what a run folder's config.yaml records, so that the run is
    rebuilt with the format it was trained in even if auto's choice or the kind's instruction change later."""
    cfg.format = fmt.name
    if isinstance(fmt, ChatFormat):
        cfg.instruction = fmt.instruction
