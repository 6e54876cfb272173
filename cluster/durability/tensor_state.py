"""Nested state (an optimizer's, a scheduler's, a module's state dict, RNG states) as safetensors + JSON, so a
checkpoint holds no pickle that loading would run: `split` puts every tensor into a flat {key: tensor} dict (for
safetensors) and leaves a JSON skeleton that names them; `join` puts them back. Dict keys keep their type (an
optimizer's state is keyed by int), and tuples stay tuples (Adam's betas)."""

from __future__ import annotations

import torch

TENSOR, ITEMS, TUPLE = "__tensor__", "__items__", "__tuple__"


def split(state, prefix: str = "state") -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON skeleton, {key: tensor}) of `state`: nested dicts, lists, tuples, tensors and JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, path: str):
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {TENSOR: path}
        if isinstance(value, dict):
            return {ITEMS: [[k, walk(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{path}: a {type(value).__name__} cannot be saved as safetensors + JSON")

    return walk(state, prefix), tensors


def join(skeleton, tensors: dict[str, torch.Tensor]):
    """The state `split` took apart; a tensor the skeleton names but `tensors` lacks raises KeyError naming it."""
    if isinstance(skeleton, list):
        return [join(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if TENSOR in skeleton:
        name = skeleton[TENSOR]
        if name not in tensors:
            raise KeyError(f"tensor {name!r} is missing from the saved tensors")
        return tensors[name]
    if TUPLE in skeleton:
        return tuple(join(v, tensors) for v in skeleton[TUPLE])
    return {k: join(v, tensors) for k, v in skeleton[ITEMS]}
