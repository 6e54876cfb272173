"""Shared-prompt packing: each prompt group becomes one sequence, the prompt once and its responses after it.

    [prompt][response 1][response 2]...[response n]

A response is every token from its first trained one to its last: a multi-turn trajectory's observation tokens
in between are context, packed with it but given no source. A custom 4-D attention mask lets each response attend to the prompt and to its own earlier tokens only, and
position ids restart after the prompt for each response, so every response sees exactly the context it was
sampled with. The prompt's forward (and backward) is done once per group instead of once per sample: with
GRPO's groups of 4 and prompts longer than responses, that is most of the learner's compute.
The packed result equals the unpacked one; the caller checks that once per model and falls back otherwise.
No DeepSpeed or Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packed:
    input_ids: torch.Tensor  # [G, P] long
    position_ids: torch.Tensor  # [G, P] long
    attention: torch.Tensor  # [G, 1, P, P] bool: query attends to key
    source: (
        torch.Tensor
    )  # [N] flat index (g * P + position) of the hidden state predicting each response token
    targets: torch.Tensor  # [N] the response tokens, in the row-major order of action_mask.bool()


def pack_groups(
    input_ids: torch.Tensor, action_mask: torch.Tensor, group_size: int, pad_id: int = 0
) -> Packed | None:
    """Pack consecutive groups of `group_size` rows that share their prompt; None when some group does not."""
    rows = input_ids.shape[0]
    if group_size < 2 or rows % group_size:
        return None
    mask = action_mask.bool()
    lengths = mask.sum(-1)
    positions = torch.arange(mask.shape[1])
    first = torch.where(mask, positions, mask.shape[1]).min(-1).values  # the prompt's last token
    last = torch.where(mask, positions, -1).max(-1).values
    groups = []
    for g in range(rows // group_size):
        members = range(g * group_size, (g + 1) * group_size)
        spans = [int(first[i]) + 1 for i in members if lengths[i] > 0]
        if not spans or len(set(spans)) != 1:
            return None
        prompt_len = spans[0]
        prompt = input_ids[g * group_size, :prompt_len]
        for i in members:
            if lengths[i] > 0 and not torch.equal(input_ids[i, :prompt_len], prompt):
                return None
        # a response runs from its first to its last trained token; tokens between that carry no loss (a
        # multi-turn trajectory's observations) are packed as context, and only trained ones get a source
        groups.append(
            (
                prompt,
                [
                    (
                        i,
                        input_ids[i, prompt_len : int(last[i]) + 2],
                        mask[i, prompt_len - 1 : int(last[i]) + 1],
                    )
                    for i in members
                    if lengths[i] > 0
                ],
            )
        )
    width = max(len(p) + sum(len(r) for _, r, _ in rs) for p, rs in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    attn = torch.zeros((len(groups), 1, width, width), dtype=torch.bool)
    source_of_row: dict[int, torch.Tensor] = {}
    for g, (prompt, responses) in enumerate(groups):
        n_prompt = len(prompt)
        ids[g, :n_prompt] = prompt
        pos[g, :n_prompt] = torch.arange(n_prompt)
        attn[g, 0, :n_prompt, :n_prompt] = torch.ones(n_prompt, n_prompt, dtype=torch.bool).tril()
        at = n_prompt
        for row, tokens, trained in responses:
            n = len(tokens)
            ids[g, at : at + n] = tokens
            pos[g, at : at + n] = torch.arange(n_prompt, n_prompt + n)
            attn[g, 0, at : at + n, :n_prompt] = True
            attn[g, 0, at : at + n, at : at + n] = torch.ones(n, n, dtype=torch.bool).tril()
            # token 0 is predicted from the prompt's last position, token k from the response's token k-1
            predictors = torch.cat([torch.tensor([n_prompt - 1]), torch.arange(at, at + n - 1)])
            source_of_row[row] = (g * width + predictors)[trained]
            at += n
        pad = torch.arange(at, width)
        attn[g, 0, pad, pad] = True  # padding attends to itself only (no empty softmax rows)
    order = [source_of_row[i] for i in range(rows) if i in source_of_row]
    source = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    return Packed(ids, pos, attn, source, input_ids[:, 1:][mask])
