"""The Quora pairs and the tiny random GPT-2 that the task tests share (test_tasks, test_objective). No network."""

from __future__ import annotations

import torch

from gpt2lab.data import QuoraPair
from gpt2lab.model import GPT2, GPT2Config

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
