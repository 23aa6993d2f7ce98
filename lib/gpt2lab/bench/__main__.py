"""Dispatch `python -m gpt2lab.bench SUITE [options]` to gpt2lab.bench.<suite>.main."""

import importlib
import sys

SUITES = ("model", "optim", "lora", "smart", "lora_optim", "train")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUITES:
        print(f"usage: python -m gpt2lab.bench {{{','.join(SUITES)}}} [options]  (--help after a suite lists its own)")
        return 2
    module = importlib.import_module(f"gpt2lab.bench.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
