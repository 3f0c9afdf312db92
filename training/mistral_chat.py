"""Conversations through mistral-common's tokenizer (`tokenizer_use_mistral_common`): token ids and trained turns.

mistral-common encodes a conversation itself (its instruct format, each message's text tokenized on its own), so
there is no rendered text and no offsets mapping to put character spans on: the chat format's spans can't be
used. Turns are found in the tokens instead, as axolotl 0.21's MistralStrategy finds them: the conversation is
encoded again with the turn's content replaced by a placeholder, and the tokens that differ are the turn's.
Two placeholders with nothing in common at either end, as axolotl's text locator uses, so a content that starts
or ends like one of them is still found whole.

One deliberate difference: axolotl (its token fallback) encodes only the conversation up to the turn. With a
system prompt in a multi-turn row, mistral-common's v3 format puts the prompt into the *last* user message, so
that prefix has it elsewhere than the whole conversation and axolotl's spans land a few tokens off. Keeping every
turn, as axolotl's own text locator does, finds the turn where it is.

End of turn: the eos token (mistral-common has no other end-of-turn token; axolotl's MistralStrategy looks for
eos in both of its passes) within 3 tokens after the turn, trained as train_on_eos / train_on_eot say.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.formats.chat_template import FORMAT as CHAT
from training.formats.chat_template import Message

_SENTINELS = ("[[dummy_message]]", "zzdummymessagezz")
_EOS_REACH = 3  # axolotl: the end token may follow a turn's content by a few template tokens
# Message keys besides role and content that reach mistral-common (axolotl's MistralPrompter passes these).
_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name")


def is_mistral_common(tokenizer) -> bool:
    return getattr(tokenizer, "backend", None) == "mistral_common"


class Unencodable(ValueError):
    """mistral-common refused the row (e.g. its fine-tuning mode wants the last turn to be the assistant's)."""


@dataclass
class MistralEncoded:
    ids: list[int]
    trained: list[tuple[int, int]]  # token ranges [lo, hi) that train
    parts: list[int]  # per token: the message it belongs to, -1 for the format's own tokens
    names: list[str]  # human names of the messages ("assistant #1")


class MistralChat:
    """Encodes the rows of one chat_template dataset entry with a mistral-common tokenizer."""

    def __init__(self, tokenizer, spec, train_on_inputs: bool):
        self.backend = tokenizer.tokenizer  # mistral_common's MistralTokenizer (fine-tuning mode)
        self.eos_id = tokenizer.eos_token_id
        self.spec = spec
        self.train_on_inputs = train_on_inputs
        self.eos_policy = spec.train_on_eos
        self.eot_policy = spec.eot_policy

    def check(self, row):
        return CHAT.check(row, self.spec)

    def encode(self, row: dict) -> MistralEncoded:
        messages = CHAT.messages(row, self.spec, self.train_on_inputs)
        for i, m in enumerate(messages):
            if m.trained and m.detail is not None:
                raise Unencodable(
                    f"messages[{i}]: training_detail marks characters, and the mistral-common tokenizer gives no "
                    "character offsets to map them to tokens (axolotl fails on it too)"
                )
        chat = [_as_dict(m) for m in messages]
        tools = row.get("tools") or None
        ids = self._ids(chat, tools)
        parts = [-1] * len(ids)
        trained: list[tuple[int, int]] = []
        last = {"eos": -1, "eot": -1}
        for i, m in enumerate(messages):
            span = self._locate(chat, i, ids, tools)
            if span is not None:
                lo, hi = span
                parts[lo:hi] = [i] * (hi - lo)
                if m.trained:
                    trained.append(span)
            # axolotl looks for a turn's end token only after turns it trains (or under "all")
            if not (m.trained or "all" in (self.eos_policy, self.eot_policy)) or span is None:
                continue
            end = self._eos_after(ids, span[1])
            if end is None:
                continue
            for kind, policy in (("eot", self.eot_policy), ("eos", self.eos_policy)):
                last[kind] = end
                if policy == "all" or (policy == "turn" and m.trained):
                    trained.append((end, end + 1))
                    parts[end] = i
        for kind, policy in (("eot", self.eot_policy), ("eos", self.eos_policy)):
            if policy == "last" and last[kind] != -1:
                trained.append((last[kind], last[kind] + 1))
        return MistralEncoded(ids, trained, parts, [f"{m.role} #{i}" for i, m in enumerate(messages)])

    # -- internals ----------------------------------------------------------------------------
    def _ids(self, chat: list[dict], tools) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(messages=chat, tools=tools)
            return list(self.backend.encode_chat_completion(request).tokens)
        except Exception as exc:  # mistral-common's validation: a message order or role it refuses
            raise Unencodable(f"mistral-common can't encode this conversation: {exc}") from None

    def _locate(self, chat: list[dict], i: int, ids: list[int], tools) -> tuple[int, int] | None:
        """Tokens [lo, hi) of turn i's content: where the whole conversation differs from itself with that
        content replaced by a placeholder (the widest span over both placeholders). None: not in the tokens."""
        if not chat[i].get("content"):
            return None
        lo, hi = len(ids), 0
        for sentinel in _SENTINELS:
            dummy = [*chat[:i], {**chat[i], "content": sentinel}, *chat[i + 1 :]]
            other = self._ids(dummy, tools)
            start = _common_prefix(ids, other)
            end = len(ids) - _common_prefix(ids[::-1][: len(ids) - start], other[::-1])
            lo, hi = min(lo, start), max(hi, end)
        return (lo, hi) if hi > lo else None

    def _eos_after(self, ids: list[int], end: int) -> int | None:
        for k in range(end, min(end + _EOS_REACH + 1, len(ids))):
            if ids[k] == self.eos_id:
                return k
        return None


def _as_dict(m: Message) -> dict:
    out = {"role": m.role, "content": m.content}
    out.update({k: m.extra[k] for k in _MESSAGE_KEYS if k in m.extra})
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
