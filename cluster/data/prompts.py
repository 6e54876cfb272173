"""Builds chat-templated `Prompt` records for an iteration from the configured task."""

from __future__ import annotations

from actors.protocol import Prompt, PromptBatch
from actors.tasks.arithmetic import ArithmeticTask, chat_messages
from cluster.config import TaskConfig


class PromptSource:
    def __init__(self, cfg: TaskConfig, tokenizer) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.task = ArithmeticTask(cfg.min_operand, cfg.max_operand, cfg.operations, cfg.seed)

    def batch(self, iteration: int) -> PromptBatch:
        prompts = []
        for p in self.task.sample(self.cfg.prompts_per_iteration, iteration):
            text = self.tokenizer.apply_chat_template(
                chat_messages(p.question), add_generation_prompt=True, tokenize=False
            )
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            prompts.append(
                Prompt(p.uid, tuple(ids), p.question, str(p.answer), (("operation", p.operation),))
            )
        return PromptBatch(tuple(prompts), iteration)
