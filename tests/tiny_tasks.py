"""The Quora pairs, the tiny random GPT-2 and the character-level toy task that the tests share (test_tasks,
test_objective, test_train, test_lora, test_soap). No network."""

from __future__ import annotations

import torch

from gpt2lab.data import QuoraPair
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.tasks import SonnetTask

PAIRS = [
    QuoraPair("a", "How do I learn Python?", "What is the best way to learn Python?", 1),
    QuoraPair("b", "What is the capital of France?", "How tall is Mount Everest?", 0),
    QuoraPair("c", "Why is the sky blue?", "What makes the sky look blue during the day?", 1),
    QuoraPair("d", "How can I lose weight fast?", "Which programming language should I learn first in college?", 0),
]


def tiny_model(seed: int = 0, **overrides) -> GPT2:
    """A random GPT2 of `GPT2Config.tiny` (128 positions), seeded."""
    torch.manual_seed(seed)
    return GPT2(GPT2Config.tiny(**overrides))


class CharTokenizer:
    """Characters as tokens (ids 0..62), 63 = end of text / padding: a 64-token vocabulary."""

    eos_token_id = pad_token_id = 63
    vocab_size = 64

    def encode(self, text):
        return [ord(c) % 63 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 32) for i in ids)


class ToyTask(SonnetTask):
    """SonnetTask on characters; evaluation is the dev loss (no sampling), so early stopping watches it."""

    def __init__(self, n_train=10):
        texts = [f"line {i}: shall I compare thee to a summer's day {i * 7}" for i in range(n_train)]
        super().__init__(CharTokenizer(), texts, ["dev a", "dev b"], ["dev sonnet one", "dev sonnet two"],
                         max_length=48, metric="dev_loss")

    def evaluate(self, model):
        return {"dev_loss": self.dev_loss(model)}
