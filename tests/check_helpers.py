"""What the exercise-check tests (test_checks*.py) share: the stub every exercise starts as, the line a stub gets,
and the two assertions on a check's one-line result."""

NOT_YET = "not implemented yet (replace `raise NotImplementedError()` with your code)"


def stub(*args, **kwargs):
    """An exercise as the learner first sees it."""
    raise NotImplementedError()


def assert_mistake_line(result, name, message):
    """The check failed with exactly one line, `✗ {name}: {message}`; a message ending in "…" is a prefix."""
    line = str(result)
    assert not result and "\n" not in line and line.count("✗") == 1, line
    if message.endswith("…"):
        assert line.startswith(f"✗ {name}: {message[:-1]}"), line
    else:
        assert line == f"✗ {name}: {message}", line


def assert_passes(result, name):
    """The check passed, with its `✓ {name}: ...` line."""
    assert result and str(result).startswith(f"✓ {name}: "), str(result)
