"""The data layer: where the files live, and loaders for the sonnets and the Quora question pairs.

Built in notebook 00 (welcome), §2. The directory comes from GPT2LAB_DATA (default <repo>/data); every
loader validates what it reads and says in one line what is wrong and how to fix it.

    python -m gpt2lab.data info        what is present, where, and whether each file verifies (size, sha256)
    python -m gpt2lab.data download    fetch the public files into the data directory (needs internet)
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DATA_ENV = "GPT2LAB_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_HINT = "python -m gpt2lab.data download"

SONNET_FILES = {
    "train": "sonnets.txt",
    "dev": "sonnets_held_out_dev.txt",
    "dev_gold": "TRUE_sonnets_held_out_dev.txt",
    "test": "sonnets_held_out.txt",
}
QUORA_FILES = {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"}
TOKENIZER_DIR = "gpt2-tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt")

_SONNETS_SRC = "https://raw.githubusercontent.com/yichang-yang/cs224n_gpt/306e163a0430dcc26697debebeefedffdd016bc7/data/"
_QUORA_TEST_SRC = "https://raw.githubusercontent.com/yichang-yang/cs224n_gpt/c541006c9c3c65b61438b229619e2e330563baad/data/"
_QUORA_DEV_SRC = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/571f43439d622b9443b984b09b1ee439b7f873df/data/"
_QUORA_TRAIN_SRC = "https://raw.githubusercontent.com/VoidMercy/minbert-default-final-project/2a5fa9e/data/"
_TOKENIZER_SRC = "https://huggingface.co/openai-community/gpt2/resolve/main/"

@dataclass(frozen=True)
class Source:
    """Where a data file comes from and what it must be: size in bytes and sha256 (None where not on record)."""

    url: str
    size: int | None
    sha256: str | None


# file in the data dir -> its source. quora-train.csv online is the full split, whose checksum is not on record.
DOWNLOADS = {
    "sonnets.txt": Source(_SONNETS_SRC + "sonnets.txt", 81_032,
                          "1e97adb7182237e431bff16d207c7c1400391cce7a6417df06080205d9257237"),
    "sonnets_held_out_dev.txt": Source(_SONNETS_SRC + "sonnets_held_out_dev.txt", 1_910,
                                       "309ae8da81a24de61a261c291c1299f5c6bfbf4e6b7d1d5b50bd15b6c1770afd"),
    "TRUE_sonnets_held_out_dev.txt": Source(_SONNETS_SRC + "TRUE_sonnets_held_out_dev.txt", 7_757,
                                            "fb41ee87e70107f554b658c8de07a6ae905298db09da84794dfaa2a61e892a1f"),
    "sonnets_held_out.txt": Source(_SONNETS_SRC + "sonnets_held_out.txt", 1_888,
                                   "daf7afd5d932acbe584d8c6e78c2669f9e97aa4967579d85ed4975b22ae33071"),
    "quora-train.csv": Source(_QUORA_TRAIN_SRC + "quora-train.csv", None, None),
    "quora-dev.csv": Source(_QUORA_DEV_SRC + "quora-dev.csv", 3_205_321,
                            "bfa3cc954a9ba300ae776a980141de65f622a3c1b97e3fd905d63245bc36d5ad"),
    "quora-test-student.csv": Source(_QUORA_TEST_SRC + "quora-test-student-30.csv", 4_714,
                                     "55ca417ee53f0d02c3e627dfb88c070800706cb4347f8108f72ea124d97572c4"),
    "gpt2-tokenizer/vocab.json": Source(_TOKENIZER_SRC + "vocab.json", 1_042_301,
                                        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "gpt2-tokenizer/merges.txt": Source(_TOKENIZER_SRC + "merges.txt", 456_318,
                                        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
# Copies that are right although they differ from the download: the offline development copy (data/README.md).
KNOWN_SUBSETS = {
    "quora-train.csv": (2_244_169, "9084a3616a0bd15c2a60afe31593f17ce5a6ee7d7481b03ddaba0ee82a234e88",
                        "the offline subset: first 14,139 rows"),
}


class OneLineError(Exception):
    """Mixin for the course's own errors whose message says everything (what was tried, what to do).

    In Jupyter, IPython calls `_render_traceback_` and shows just that one line instead of a traceback through
    library code; plain Python still prints the usual traceback.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


def first_line(err: Exception) -> str:
    """The first line of an error's message (its type's name when the message is empty), to quote in one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class DataError(OneLineError, ValueError):
    """A data file is present but wrong: the message names the file, the row and the problem."""


class DataFileMissing(OneLineError, FileNotFoundError):
    """A data file is absent: the message names it, the directory searched and the command that fetches it."""


def data_dir() -> Path:
    """The data directory: $GPT2LAB_DATA if set, else <repo>/data."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


def shown_path(path: Path) -> str:
    """A path as printed to learners: relative to the repo when it sits in or beside it, else absolute, with the
    home folder written `~` (so outputs kept in the notebooks read the same on every machine)."""
    relative = os.path.relpath(path, REPO_ROOT)
    if not relative.startswith(os.path.join(os.pardir, os.pardir)):
        return relative
    home = Path.home()
    path = Path(path)
    return str(Path("~") / path.relative_to(home)) if path.is_relative_to(home) and path != home else str(path)


def data_path(name: str) -> Path:
    """Path of a data file, or DataFileMissing in one line that says how to get it.

    A file whose size differs from the download manifest gets one warning line (once per file): a cheap check
    on every load; `python -m gpt2lab.data info` verifies the sha256 too.
    """
    path = data_dir() / name
    if not path.exists():
        raise DataFileMissing(
            f"{name} not found in {path.parent} (set {DATA_ENV} to the folder that holds it, or run `{FETCH_HINT}`)"
        )
    warn_if_resized(name, path)
    return path


_warned: set[Path] = set()


def warn_if_resized(name: str, path: Path) -> bool:
    """Print one line to stderr (once per file) if `path` is not the size the manifest lists for `name`."""
    source, subset = DOWNLOADS.get(name), KNOWN_SUBSETS.get(name)
    if source is None or source.size is None or path in _warned:
        return False
    size = path.stat().st_size
    if size == source.size or (subset and size == subset[0]):
        return False
    _warned.add(path)
    print(f"warning: {shown_path(path)} has {size:,} bytes, not {source.size:,} (truncated or damaged?); "
          f"`python -m gpt2lab.data info` checks it, `{FETCH_HINT}` re-fetches it", file=sys.stderr)
    return True


def read_text(path: Path, name: str) -> str:
    """A data file as UTF-8 text; bytes that are not UTF-8 give DataError naming the line and what to do."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{name}: line {line}, column {column}: byte 0x{raw[err.start]:02x} is not UTF-8 (damaged, or re-saved "
            f"in another encoding); re-fetch it with `{FETCH_HINT} --force`, or save it again as UTF-8"
        ) from None


def describe_data_dir() -> list[tuple[str, bool]]:
    """(file, present?) for every file the course reads."""
    names = [*SONNET_FILES.values(), *QUORA_FILES.values(), *(f"{TOKENIZER_DIR}/{f}" for f in TOKENIZER_FILES)]
    root = data_dir()
    return [(name, (root / name).is_file()) for name in names]


def normalize_text(text: str) -> str:
    """The one normalisation applied to every sentence, train and eval alike: NFC, single spaces, stripped."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


# ----------------------------------------------------------------------------------------------- sonnets


@dataclass(frozen=True)
class Sonnet:
    """One sonnet (or a sonnet's first lines, for the dev/test prompts): its number and its text."""

    number: int
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    def __str__(self) -> str:
        return self.text


def parse_sonnets(text: str, source: str = "<text>") -> list[Sonnet]:
    """Split a sonnet file on lines that hold only a number; drop the header before the first one."""
    blocks = re.split(r"^[ \t]*(\d+)[ \t]*$", text, flags=re.MULTILINE)
    # blocks = [header, number, body, number, body, ...]
    sonnets = []
    for number, body in zip(blocks[1::2], blocks[2::2]):
        body = body.strip("\n").rstrip()
        if not body.strip():
            raise DataError(f"{source}: sonnet {number} has no lines (is the file truncated?)")
        sonnets.append(Sonnet(int(number), body))
    if not sonnets:
        raise DataError(f"{source}: no sonnets found (expected lines holding only a sonnet number)")
    return sonnets


def load_sonnets(split: str = "train", gold: bool = False) -> list[Sonnet]:
    """Sonnets of a split: train (1-131, full), dev (prompts: first 3 lines of 132-143), test (prompts).

    `gold=True` with split="dev" gives the full dev sonnets, the chrF references. Built in notebook 00, §2.
    """
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be 'train', 'dev' or 'test', not {split!r}")
    if gold and split != "dev":
        raise ValueError("gold=True exists only for split='dev' (the test sonnets were never published)")
    name = SONNET_FILES["dev_gold" if gold else split]
    path = data_path(name)
    return parse_sonnets(read_text(path, name), source=name)


# ------------------------------------------------------------------------------------------------- quora


@dataclass(frozen=True)
class QuoraPair:
    """One question pair; `label` is 1 (paraphrase), 0 (not) or None (test split, unlabelled)."""

    id: str
    sentence1: str
    sentence2: str
    label: int | None


@dataclass(frozen=True)
class BadRow:
    line: int
    problem: str


@dataclass
class QuoraSplit:
    """The pairs of one split, plus the malformed rows that were reported and left out (never silently)."""

    name: str
    pairs: list[QuoraPair]
    bad_rows: list[BadRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    def __iter__(self) -> Iterator[QuoraPair]:
        return iter(self.pairs)

    def report(self) -> str:
        if not self.bad_rows:
            return f"{self.name}: {len(self.pairs)} pairs"
        where = ", ".join(f"line {b.line} ({b.problem})" for b in self.bad_rows[:5])
        more = f" and {len(self.bad_rows) - 5} more" if len(self.bad_rows) > 5 else ""
        return f"{self.name}: {len(self.pairs)} pairs; left out {len(self.bad_rows)} malformed rows: {where}{more}"


REQUIRED_COLUMNS = ("id", "sentence1", "sentence2")
LABEL_COLUMN = "is_duplicate"


def _unquote(field_text: str) -> str:
    """Undo CSV quoting of one tab-separated field: drop the outer quotes, turn each doubled quote into one."""
    if len(field_text) >= 2 and field_text[0] == '"' and field_text[-1] == '"':
        return field_text[1:-1].replace('""', '"')
    return field_text


def _parse_label(raw: str) -> int:
    value = float(raw)  # ValueError for empty or text labels
    if value not in (0.0, 1.0):
        raise ValueError(f"label {raw!r} is not 0 or 1")
    return int(value)


def parse_quora(text: str, source: str = "<text>", labelled: bool = True, on_bad: str = "report") -> QuoraSplit:
    """Parse a tab-separated Quora file, reading columns by name (both layouts: with or without index column).

    Each physical line is one row (the files hold no embedded tabs or newlines), so line numbers are exact.
    Rows whose label is empty or not 0/1 are collected in `bad_rows` (on_bad="report") or raise (on_bad="raise").
    """
    if on_bad not in ("report", "raise"):
        raise ValueError(f"on_bad must be 'report' or 'raise', not {on_bad!r}")
    lines = text.split("\n")
    if not text.strip():
        raise DataError(f"{source}: the file is empty (expected a header line with id, sentence1, sentence2)")
    header = [h.strip() for h in lines[0].rstrip("\r").split("\t")]
    if len(header) == 1 and "," in header[0]:
        raise DataError(f"{source}: line 1: the columns are separated by commas; the Quora files are tab-separated")
    missing = [c for c in (*REQUIRED_COLUMNS, *((LABEL_COLUMN,) if labelled else ())) if c not in header]
    if missing:
        raise DataError(f"{source}: line 1: missing column(s) {', '.join(missing)}; found {header} (tab-separated)")
    col = {name: header.index(name) for name in (*REQUIRED_COLUMNS, LABEL_COLUMN) if name in header}
    pairs, bad = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        problem = None
        if len(fields) != len(header):
            problem = f"{len(fields)} fields, expected {len(header)}"
        else:
            fields = [_unquote(f) for f in fields]
            label = None
            if labelled:
                try:
                    label = _parse_label(fields[col[LABEL_COLUMN]])
                except ValueError:
                    raw = fields[col[LABEL_COLUMN]]
                    problem = "empty label" if not raw.strip() else f"unparsable label {raw!r}"
        if problem:
            if on_bad == "raise":
                raise DataError(f"{source}: line {lineno}: {problem}")
            bad.append(BadRow(lineno, problem))
            continue
        pairs.append(
            QuoraPair(
                id=fields[col["id"]].strip(),
                sentence1=normalize_text(fields[col["sentence1"]]),
                sentence2=normalize_text(fields[col["sentence2"]]),
                label=label,
            )
        )
    if not pairs:
        raise DataError(f"{source}: no usable rows (the file has only a header, or every row is malformed)")
    return QuoraSplit(source, pairs, bad)


def load_quora(split: str = "train", limit: int | None = None, verbose: bool = True) -> QuoraSplit:
    """Question pairs of a split (train / dev labelled, test unlabelled). Built in notebook 00, §2.

    Malformed rows are left out and reported in one printed line (and kept in `.bad_rows`).
    Note: the offline train file is only the first 14,139 rows of its split (data/README.md).
    """
    if split not in QUORA_FILES:
        raise ValueError(f"split must be one of {sorted(QUORA_FILES)}, not {split!r}")
    name = QUORA_FILES[split]
    result = parse_quora(read_text(data_path(name), name), source=name, labelled=split != "test")
    if verbose and result.bad_rows:
        print(result.report())  # stdout: a notice, not an error (stderr shows as a red box in a notebook)
    if limit is not None:
        result.pairs = result.pairs[:limit]
    return result


def duplicate_rate(pairs) -> float:
    """Fraction of labelled pairs that are paraphrases (label 1). Built in notebook 00, §2 (exercise)."""
    labels = [p.label for p in pairs]
    if not labels:
        raise ValueError("duplicate_rate needs at least one pair")
    if any(label not in (0, 1) for label in labels):
        raise ValueError("duplicate_rate needs labelled pairs (label 0 or 1); the test split has no labels")
    return sum(labels) / len(labels)


# -------------------------------------------------------------------------------------- command line


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(name: str, path: Path | None = None) -> tuple[bool, str]:
    """(usable?, what it is) for a data file: size first (cheap, catches truncation), then sha256."""
    path = path or data_dir() / name
    if not path.is_file():
        return False, "missing"
    size, source, subset = path.stat().st_size, DOWNLOADS.get(name), KNOWN_SUBSETS.get(name)
    if subset and size == subset[0] and sha256(path) == subset[1]:
        return True, f"ok ({subset[2]})"
    if source is None or source.sha256 is None:
        return True, "present (no checksum on record)"
    if source.size is not None and size != source.size:
        return False, f"{'truncated' if size < source.size else 'too long'}: {size:,} bytes, expected {source.size:,}"
    if sha256(path) != source.sha256:
        return False, "damaged: sha256 differs from the download"
    return True, "ok"


def download(force: bool = False) -> None:
    """Fetch the course files into the data directory (needs internet; tests never call it for real).

    A present file is kept if it verifies (see verify()); a missing, truncated or damaged one is fetched again.
    Offline, the first failure stops with one line saying where to put the files by hand.
    """
    root = data_dir()
    for name, source in DOWNLOADS.items():
        target = root / name
        if target.exists() and not force and verify(name, target)[0]:
            print(f"[skip] {name} (present)")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        print(f"[get ] {name} <- {source.url}")
        try:
            with urllib.request.urlopen(source.url, timeout=60) as response, open(tmp, "wb") as out:
                out.write(response.read())
        except urllib.error.HTTPError as err:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{name}: the server answered HTTP {err.code} for {source.url}; try again later, or "
                            f"copy the file there by hand into {shown_path(root)}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            tmp.unlink(missing_ok=True)
            reason = getattr(err, "reason", err)
            raise DataError(f"network unreachable ({reason}) fetching {name}: on a machine that is online run "
                            f"`{FETCH_HINT}` and copy the files into {shown_path(root)} (names in data/README.md), "
                            f"or point {DATA_ENV} at a folder that has them") from None
        ok, state = verify(name, tmp)
        if not ok:
            tmp.unlink()
            raise DataError(f"{name}: checksum mismatch after download from {source.url} ({state}); "
                            "the file was not kept")
        tmp.replace(target)  # atomic: an interrupted download never leaves a half file under the real name


def info() -> bool:
    """Print every data file with its size and whether it verifies; True if all are present and sound."""
    root = data_dir()
    print(f"data directory: {root}  ({'from ' + DATA_ENV if os.environ.get(DATA_ENV) else 'default'})")
    missing, damaged = [], []
    for name, present in describe_data_dir():
        ok, state = verify(name, root / name)
        if not present:
            missing.append(name)
            print(f"    missing  {name}")
            continue
        fix = "" if ok else f"; `{FETCH_HINT}` fetches it again"
        print(f"  {(root / name).stat().st_size:>9,} bytes  {name}  {state}{fix}")
        if not ok:
            damaged.append(name)
    if missing:
        print(f"fetch the missing files with `{FETCH_HINT}`, or point {DATA_ENV} at a folder that has them")
    return not (missing or damaged)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gpt2lab.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="list the data files and whether they are present")
    get = sub.add_parser("download", help="fetch the public data files (needs internet)")
    get.add_argument("--force", action="store_true", help="download again even if present")
    args = parser.parse_args(argv)
    if args.command == "info":
        return 0 if info() else 1
    try:
        download(force=args.force)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
