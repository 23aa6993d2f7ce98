"""One-line ✓/✗ feedback for the exercises, one module per notebook.

A notebook does `from gpt2lab.checks import welcome as check` and, after an exercise, `check.tokens_per_line(fn)`.
The shared machinery is in `core`: the result type, `check` (stub -> "not implemented yet", a crash -> a ✗ naming
the student's line), `expect`, `compare` (element, expected vs got, max |diff|; tuple and dtype hints),
`compare_with_hints` (a known mistake's output -> its hint; `known_mistake`: the hint alone), `untouched` (inputs
modified in place; `new_tensors` for exercises that return new ones), `returned_pair`, `gradients` /
`compare_gradients` (a trained exercise must pass gradients on), `earlier_stubs`.

THE RULES for every check (learned on notebooks 00-04, where plausible wrong answers slipped through; apply them to
05-09). A check is only as good as the inputs it runs on and the way it runs the code:

1. The test model must make the mistake visible. A freshly initialised tiny GPT-2 is in effect a bigram model:
   sampling instead of argmax, a fresh KV cache at every step and a cache filled from the last prompt token alone
   all reproduce its greedy path. A decoding check needs a model in which earlier tokens change the next one
   (`checks.gpt2._test_model`: scaled attention and embeddings), and a test proving each such mistake changes it.
2. Inputs separate a near-miss from the answer by at least 10x the tolerance: erf vs tanh GELU needs O(1)
   activations (they differ by ~1e-6 on small ones, under an atol of 1e-5); left padding needs rows with different
   pad counts (so per-row position ids differ from row 0's and from 0..T-1); per-group learning rates need groups
   that differ, under a scheduler.
3. Run the code the way it will be used: with gradients on when the exercise is trained (compare each parameter's
   gradient with the reference's: a head built from `.data` gives the right logits and trains nothing), and on the
   caller's real tensors, not clones, checked afterwards with `untouched` ("you modified x in place: ...").
4. Never build the reference with the library code under test (e.g. position ids for the transformers parity
   check are counted by hand, not with `position_ids_from_mask`).
5. Messages: a crash names the student's own line, never one inside torch, site-packages, the standard library or
   this package; a label names a condition (left-padded, with a scheduler, ...) only when that condition is what
   failed (compare the plain case first); every common mistake that is cheap to detect gets a targeted hint (ln_f
   applied twice, probabilities instead of logits, a missing or extra scale, a tuple returned, a wrong dtype, -inf
   written as 0, the input modified in place).
6. Every planted mistake becomes a test that asserts the exact ✗ line (tests/test_checks*.py); each exercise has a
   test for its stub and, where natural, for a correct alternative formulation, which must pass.
7. A check cell runs in well under 2 s in quick mode on a CPU (tiny models, a handful of steps).
"""

from .core import (
    CheckResult,
    check,
    compare,
    compare_gradients,
    compare_with_hints,
    earlier_stubs,
    expect,
    fail,
    gradients,
    known_mistake,
    new_tensors,
    ok,
    returned_pair,
    untouched,
)

__all__ = [
    "CheckResult",
    "check",
    "compare",
    "compare_gradients",
    "compare_with_hints",
    "earlier_stubs",
    "expect",
    "fail",
    "known_mistake",
    "gradients",
    "new_tensors",
    "ok",
    "returned_pair",
    "untouched",
]
