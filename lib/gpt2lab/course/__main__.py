"""`python -m gpt2lab.course {build,execute,grade} ...`: the course's command line.

`build` and `execute` are this package's (gpt2lab.course.main); `grade` is gpt2lab.course.grading's, which builds on
the handout machinery (it grades the handouts course makes). Dispatching here, above both, keeps the imports one
way.
"""

import sys

from gpt2lab import course
from gpt2lab.course import grading


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grade"]:
        return grading.cli(argv[1:])
    return course.main(argv)


if __name__ == "__main__":
    sys.exit(main())
