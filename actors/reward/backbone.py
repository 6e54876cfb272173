"""A frozen reward backbone: one forward pass gives, per (prompt, response), the response feature (ArmoRM stage 1)
and the prompt feature at the end of the final user turn (ArmoRM stage 2's gate input).

Encoding (`encode`, shared by serving and by RM training's `tokenize_for_rm`): the chat template renders the
prompt plus the response as an assistant message (`add_generation_prompt=False`), and the sequence ends at the
template's end-of-turn token of that assistant turn (`<|im_end|>`, Llama-3's `<|eot_id|>`, Gemma's
`<end_of_turn>`, ...), where the response feature is read. The end-of-turn token is found by rendering a sentinel
assistant message and taking the first special token the template writes after it (`turn_suffix`); a template
that writes nothing after an assistant message gets `eos_token` appended. The prompt feature is read at the last
end-of-turn token of the prompt (the one closing the final user turn).

Truncation, one rule (`fit_prompt`, then the response): the prompt (everything up to the assistant header,
included) gets max_length // 2 tokens whatever the response. Over that, the system block and the last user turn
stay: earlier turns go first, oldest first (whole user-led turns, so roles still alternate); then the middle of
the last user turn's text is cut (its first third and last two thirds of what fits stay, joined by " ... ");
only when the system block alone leaves no room is the rendered prompt cut from the left. The response keeps its
first tokens that fit in the rest, and the end-of-turn token is always kept. Both sides of a preference pair
therefore share one prompt, training sees exactly the ids serving scores, and `Encoded.cut` says whether
anything was cut (jobs count it).

Sequences are right-padded and features gathered at explicit indices, never at "first pad - 1" (ArmoRM pitfall 5:
with pad == end-of-turn that reads the user turn), nor at position -1 (HaF pitfall: a pad in the shorter side).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ENCODING_VERSION = 3  # part of the feature-cache fingerprint: bump when `encode` changes
_SENTINEL = "Zq7xWv3Kp"


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]  # ends with the assistant turn's end-of-turn token (read there)
    prompt_end: int  # index of the end-of-turn token closing the final user turn
    response_start: int  # index of the first response token
    cut: bool = False  # the prompt or the response was truncated to fit max_length


def _ids(out):
    return list(out["input_ids"] if not isinstance(out, list) else out)


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    return _ids(
        tokenizer.apply_chat_template(list(messages), add_generation_prompt=generation_prompt, tokenize=True)
    )


def special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    return ids


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (eos_token when it writes nothing after it)."""
    key = (tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template)
    if key not in _EOT:
        _EOT[key] = _find_end_of_turn(tokenizer)
    return _EOT[key]


_EOT: dict[tuple, int] = {}


def _find_end_of_turn(tokenizer) -> int:
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    at = text.rfind(_SENTINEL)
    if at < 0:
        raise ValueError("the chat template does not render the assistant message's content")
    suffix = tokenizer(text[at + len(_SENTINEL) :], add_special_tokens=False)["input_ids"]
    special = special_ids(tokenizer)
    for token in suffix:
        if token in special:
            return token
    if suffix:
        return suffix[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the chat template writes nothing after an assistant turn and there is no eos_token")
    return tokenizer.eos_token_id


def _system_count(messages: Sequence[dict]) -> int:
    n = 0
    while n < len(messages) - 1 and messages[n].get("role") == "system":
        n += 1
    return n


def _cut_middle(tokenizer, messages: list[dict], budget: int) -> list[dict] | None:
    """The last message with the middle of its text cut so the rendered prompt fits, or None if nothing can."""
    *before, last = messages
    ids = tokenizer(str(last.get("content", "")), add_special_tokens=False)["input_ids"]
    keep, candidate = len(ids), messages
    for _ in range(8):  # decode/encode is not exact at the cut: each round removes what still overflows
        over = len(_render(tokenizer, candidate, True)) - budget
        if over <= 0:
            return candidate
        keep -= over
        if keep <= 0:
            return None
        head = keep // 3  # the end of a long turn (usually the question) matters most
        tail = tokenizer.decode(ids[len(ids) - (keep - head) :])
        text = tokenizer.decode(ids[:head]).rstrip() + " ... " + tail.lstrip()
        candidate = [*before, {**last, "content": text}]
    return None


def fit_prompt(tokenizer, prompt: Sequence[dict], budget: int) -> tuple[list[dict], bool]:
    """(messages whose rendered generation prompt fits in `budget` tokens where possible, whether any were cut)."""
    messages = list(prompt)
    if len(_render(tokenizer, messages, True)) <= budget:
        return messages, False
    if not messages:
        return messages, True
    n_sys = _system_count(messages)
    system, middle, last = messages[:n_sys], messages[n_sys:-1], messages[-1:]
    # Drop earlier turns oldest first, restarting at a user message so roles keep alternating.
    starts = [j for j, m in enumerate(middle) if m.get("role") == "user" and j > 0] + [len(middle)]
    for j in starts:
        candidate = system + middle[j:] + last
        if len(_render(tokenizer, candidate, True)) <= budget:
            return candidate, True
    fitted = _cut_middle(tokenizer, system + last, budget)
    return (fitted if fitted is not None else system + last), True


def _split(tokenizer, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, ids after them) of the conversation with `response` as the assistant message."""
    messages = [*prompt, {"role": "assistant", "content": response}]
    head_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    if full_text.startswith(head_text):
        # The prompt ids are the generation prompt's, as the policy saw them; the rest is tokenized after it.
        rest = tokenizer(full_text[len(head_text) :], add_special_tokens=False)["input_ids"]
        return _render(tokenizer, prompt, True), rest
    # a template that renders the history differently once answered: split at the common prefix
    head, full = _render(tokenizer, prompt, True), _render(tokenizer, messages, False)
    start = 0
    while start < min(len(head), len(full)) and head[start] == full[start]:
        start += 1
    return full[:start], full[start:]


def encode(tokenizer, prompt: Sequence[dict], response: str, max_length: int) -> Encoded:
    """Chat-templated prompt + response up to the assistant turn's end-of-turn token, truncated by the rule above."""
    eot = end_of_turn_id(tokenizer)
    budget = max_length // 2
    messages, cut = fit_prompt(tokenizer, prompt, budget)
    prompt_ids, rest = _split(tokenizer, messages, response)
    if len(prompt_ids) > budget:  # last resort: the system block alone leaves no room
        prompt_ids, cut = prompt_ids[len(prompt_ids) - budget :], True
    ends = [i for i, t in enumerate(rest) if t == eot]
    body = rest[: ends[-1]] if ends else rest
    room = max(0, max_length - len(prompt_ids) - 1)
    cut = cut or len(body) > room
    body = body[:room] + [eot]
    user_ends = [i for i, t in enumerate(prompt_ids) if t == eot]
    prompt_end = user_ends[-1] if user_ends else max(0, len(prompt_ids) - 1)
    return Encoded(tuple(prompt_ids + body), prompt_end, len(prompt_ids), cut)


def pad_batch(encoded: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    return ids, mask


def gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, d], index [B] -> [B, d]."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.to(hidden.device)]


class RewardBackbone:
    """A causal LM body (no LM head) run frozen in eval mode in `dtype` (auto | bfloat16 | float32); features are
    float32 on the CPU whatever the compute dtype."""

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        device: str | None = None,
        max_length: int = 512,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        from troupe.actors.hardware import resolve_dtype

        dtype = resolve_dtype(dtype)
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"reward backbone dtype must be auto, bfloat16 or float32, got {dtype!r}")
        self.path = path
        self.dtype = dtype
        self.max_length = max_length
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModel.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval().requires_grad_(False)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.hidden_size = self.model.config.hidden_size

    def encode_rows(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> list[Encoded]:
        return [
            encode(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses, strict=True)
        ]

    def features(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str], batch_size: int = 8):
        """(response_features [N, d], prompt_features [N, d]) in float32."""
        return self.features_of(self.encode_rows(prompts, responses), batch_size)

    @torch.no_grad()
    def features_of(self, enc: Sequence[Encoded], batch_size: int = 8):
        """`features` of rows already encoded (callers that count cut rows encode once)."""
        # Batch by length so padding is small; rows return in input order.
        order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
        resp = torch.zeros(len(enc), self.hidden_size)
        prom = torch.zeros(len(enc), self.hidden_size)
        for lo in range(0, len(order), batch_size):
            rows = order[lo : lo + batch_size]
            chunk = [enc[i] for i in rows]
            ids, mask = pad_batch(chunk, self.pad_id)
            hidden = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
            ).last_hidden_state.float()
            resp[rows] = gather_rows(hidden, torch.tensor([len(e.input_ids) - 1 for e in chunk])).cpu()
            prom[rows] = gather_rows(hidden, torch.tensor([e.prompt_end for e in chunk])).cpu()
        return resp, prom
