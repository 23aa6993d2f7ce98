"""Shared fixtures. Data-dependent tests skip when the data is absent, except in CI (GPT2LAB_REQUIRE_DATA=1 or
CI set), where a missing data file or tokenizer is a failure."""

from __future__ import annotations

import os

import pytest

from gpt2lab import data


def _require_data() -> bool:
    return bool(os.environ.get("GPT2LAB_REQUIRE_DATA") or os.environ.get("CI"))


def need(*names: str):
    """Return the data directory if every file is present; otherwise skip (locally) or fail (in CI)."""
    missing = [n for n in names if not (data.data_dir() / n).exists()]
    if missing:
        message = f"data missing in {data.data_dir()}: {', '.join(missing)} (set GPT2LAB_DATA)"
        if _require_data():
            pytest.fail(message)
        pytest.skip(message)
    return data.data_dir()


@pytest.fixture(scope="session")
def sonnet_data():
    return need(*(data.SONNET_FILES.values()))


@pytest.fixture(scope="session")
def quora_data():
    return need(*(data.QUORA_FILES.values()))


@pytest.fixture(scope="session")
def tokenizer():
    need(*(f"{data.TOKENIZER_DIR}/{f}" for f in data.TOKENIZER_FILES))
    from gpt2lab import tokenizer as tok

    return tok.load()


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny-model tests: a second thread only adds overhead, and much more on a
    shared, busy machine (a spinning thread pool). `pytestmark = pytest.mark.usefixtures("one_thread")` asks for it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
