"""gpt2lab: build GPT-2 and its fine-tuning toolbox from scratch, one notebook at a time.

Every module here is the one importable copy of something a notebook builds; each object's docstring
names that notebook. Layers (each imports only from the ones before it):
data, weights (finding GPT-2 checkpoints: local folder, Hugging Face cache, hub), tokenizer, metrics -> attention
-> model -> generate; optim and lora (no GPT-2 knowledge); smart; tasks and runs (run names, locks, checkpoint
files) -> train -> experiments -> bench. `checks` (the exercises' feedback) and `course` (handouts from the
solutions, and the grader: `python -m gpt2lab.course build|execute|grade`) serve the notebooks and tooling.
"""

from .environment import Setup, setup

__version__ = "0.1.0"
__all__ = ["Setup", "setup", "__version__"]
