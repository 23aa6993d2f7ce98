"""The data layer: real files (counts, malformed rows, both Quora layouts) and every bad-input path."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest

from gpt2lab import data

# ------------------------------------------------------------------------------------ real files


def test_sonnet_splits_follow_the_file_numbering(sonnet_data):
    train, dev, gold, test = (data.load_sonnets("train"), data.load_sonnets("dev"),
                              data.load_sonnets("dev", gold=True), data.load_sonnets("test"))
    assert [len(train), len(dev), len(gold), len(test)] == [131, 12, 12, 12]
    assert [s.number for s in train] == list(range(1, 132))
    assert [s.number for s in dev] == [s.number for s in gold] == list(range(132, 144))
    assert [s.number for s in test] == list(range(145, 157))
    assert all(len(s.lines) == 3 for s in dev + test)
    # the dev prompts are exactly the first three lines of the gold sonnets
    assert all(p.lines == g.lines[:3] for p, g in zip(dev, gold))
    lengths = {s.number: len(s.lines) for s in train}
    assert lengths[99] == 15 and lengths[126] == 12 and sum(n == 14 for n in lengths.values()) == 129
    assert train[17].lines[0] == "Shall I compare thee to a summer's day?"
    assert train[17].lines[-1] == "  So long lives this, and this gives life to thee."  # couplet indent kept
    assert "Folger" not in "".join(s.text for s in train)  # header dropped


def test_quora_splits_report_the_malformed_rows(quora_data, capsys):
    train = data.load_quora("train")
    dev = data.load_quora("dev")
    assert [(b.line, b.problem) for b in train.bad_rows] == [(11662, "empty label"), (12412, "empty label")]
    assert [(b.line, b.problem) for b in dev.bad_rows] == [(2577, "empty label"), (14222, "empty label")]
    assert len(train) == 14_139 - 2 and len(dev) == 20_214 - 2
    assert sum(p.label for p in dev) == 7_585 and sum(1 - p.label for p in dev) == 12_627
    err = capsys.readouterr().out  # stdout: a notice, not a red stderr box in the notebook
    assert "line 11662" in err and "line 14222" in err  # reported, never silently dropped
    test = data.load_quora("test")
    assert len(test) == 30 and all(p.label is None for p in test)
    assert test[0].id.startswith("216588 ")
    assert len({p.id for p in train} | {p.id for p in dev}) == len(train) + len(dev)


@pytest.mark.parametrize("name", ["quora-dev.csv", "quora-test-student.csv", "samples/quora-train-30.csv"])
def test_quora_parser_agrees_with_csv_module_on_good_rows(quora_data, name):
    """Column-by-name reading with CSV unquoting, as csv.DictReader does, on both layouts."""
    path = quora_data / name
    labelled = "test" not in name
    parsed = data.parse_quora(path.read_text(encoding="utf-8"), source=name, labelled=labelled)
    bad_lines = {b.line for b in parsed.bad_rows}
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    expected = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line or lineno in bad_lines:
            continue
        row = next(csv.DictReader([lines[0], line], delimiter="\t"))
        expected.append((row["id"], data.normalize_text(row["sentence1"]), data.normalize_text(row["sentence2"]),
                         int(float(row["is_duplicate"])) if labelled else None))
    got = [(p.id, p.sentence1, p.sentence2, p.label) for p in parsed]
    assert got == expected
    assert any('"' in p.sentence1 + p.sentence2 for p in parsed) or "30" in name  # quoting really exercised


def test_limit_and_split_names(quora_data):
    assert len(data.load_quora("dev", limit=5, verbose=False)) == 5
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_quora("valid")
    with pytest.raises(ValueError, match="split must be 'train', 'dev' or 'test'"):
        data.load_sonnets("validation")
    with pytest.raises(ValueError, match="gold=True exists only for split='dev'"):
        data.load_sonnets("test", gold=True)


def test_duplicate_rate():
    pairs = [data.QuoraPair(str(i), "a", "b", label) for i, label in enumerate([1, 0, 0, 1, 1])]
    assert data.duplicate_rate(pairs) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="at least one pair"):
        data.duplicate_rate([])
    with pytest.raises(ValueError, match="test split has no labels"):
        data.duplicate_rate([data.QuoraPair("x", "a", "b", None)])


# ------------------------------------------------------------------------------------ bad inputs

HEADER_INDEXED = "\tid\tsentence1\tsentence2\tis_duplicate"
HEADER_PLAIN = "id\tsentence1\tsentence2\tis_duplicate"


def test_both_layouts_and_quoting():
    text_indexed = HEADER_INDEXED + '\n7\tabc\t"He said ""hi"""\tHow  are\tyou?\t1.0\n8\tdef\tA\tB\t0.0\n'
    text_plain = HEADER_PLAIN + '\nabc\t"He said ""hi"""\tHow  are\tyou?\t1.0\n'
    indexed = data.parse_quora(text_indexed.replace("\tyou?", " you?"))
    plain = data.parse_quora(text_plain.replace("\tyou?", " you?"))
    assert indexed[0] == plain[0] == data.QuoraPair("abc", 'He said "hi"', "How are you?", 1)
    assert indexed[1].label == 0


def test_missing_column_names_file_and_columns():
    with pytest.raises(data.DataError, match=r"q\.csv: line 1: missing column\(s\) is_duplicate"):
        data.parse_quora("id\tsentence1\tsentence2\nx\ta\tb\n", source="q.csv")
    expected = r"missing column\(s\) sentence2, is_duplicate; found \['id', 'sentence1', 'label'\]"
    with pytest.raises(data.DataError, match=expected):
        data.parse_quora("id\tsentence1\tlabel\nx\ta\t1\n", source="q.csv")
    with pytest.raises(data.DataError, match="separated by commas; the Quora files are tab-separated"):
        data.parse_quora("id,sentence1,sentence2,is_duplicate\nx,a,b,1\n", source="q.csv")
    assert data.parse_quora("id\tsentence1\tsentence2\nx\ta\tb\n", labelled=False)[0].label is None


def test_empty_file_and_header_only():
    with pytest.raises(data.DataError, match="q.csv: the file is empty"):
        data.parse_quora("", source="q.csv")
    with pytest.raises(data.DataError, match="no usable rows"):
        data.parse_quora(HEADER_PLAIN + "\n", source="q.csv")


def test_bad_labels_reported_with_line_numbers_or_raised():
    text = HEADER_PLAIN + "\na\tx\ty\t1.0\nb\tx\ty\t\nc\tx\ty\tmaybe\nd\tx\ty\t2\ne\tx\ty\nf\tx\ty\t0\n"
    parsed = data.parse_quora(text, source="q.csv")
    assert [p.id for p in parsed] == ["a", "f"]
    assert [(b.line, b.problem) for b in parsed.bad_rows] == [
        (3, "empty label"), (4, "unparsable label 'maybe'"), (5, "unparsable label '2'"), (6, "3 fields, expected 4")
    ]
    assert "left out 4 malformed rows: line 3 (empty label)" in parsed.report()
    with pytest.raises(data.DataError, match=r"q\.csv: line 3: empty label"):
        data.parse_quora(text, source="q.csv", on_bad="raise")
    with pytest.raises(ValueError, match="on_bad must be"):
        data.parse_quora(text, on_bad="ignore")


def test_missing_file_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    with pytest.raises(data.DataFileMissing) as err:
        data.load_sonnets("train")
    message = str(err.value)
    assert "sonnets.txt not found in" in message and str(tmp_path) in message
    assert "python -m gpt2lab.data download" in message and "\n" not in message
    with pytest.raises(data.DataFileMissing, match="quora-dev.csv not found"):
        data.load_quora("dev")


def test_sonnet_parser_errors():
    with pytest.raises(data.DataError, match="s.txt: no sonnets found"):
        data.parse_sonnets("just a header\nand text\n", source="s.txt")
    with pytest.raises(data.DataError, match="s.txt: sonnet 2 has no lines"):
        data.parse_sonnets("header\n\n1\n\nline one\nline two\n\n2\n\n", source="s.txt")
    parsed = data.parse_sonnets("header\n\n 1 \n\nFirst line\n  couplet\n\n2\nSecond")
    assert [(s.number, s.lines) for s in parsed] == [(1, ["First line", "  couplet"]), (2, ["Second"])]


def test_normalize_text_is_shared_by_every_split():
    assert data.normalize_text("  Cafe\u0301   au\tlait \n") == "Caf\u00e9 au lait"


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path.resolve()
    monkeypatch.delenv("GPT2LAB_DATA")
    assert data.data_dir() == data.REPO_ROOT / "data"


def test_info_lists_missing_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    (tmp_path / "sonnets.txt").write_text("x")
    assert data.main(["info"]) == 1
    out = capsys.readouterr().out
    assert "1 bytes  sonnets.txt  truncated: 1 bytes, expected 81,032" in out
    assert "missing  quora-dev.csv" in out and "gpt2lab.data download" in out


# ------------------------------------------------------------------------------------ damaged copies


@pytest.fixture
def data_copy(tmp_path, monkeypatch, sonnet_data, quora_data, tokenizer):
    """A temporary GPT2LAB_DATA holding copies of the real files, to damage."""
    for name, _ in data.describe_data_dir():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sonnet_data / name, tmp_path / name)
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    return tmp_path


def test_info_verifies_real_files(sonnet_data, quora_data, tokenizer, capsys):
    assert data.main(["info"]) == 0
    out = capsys.readouterr().out
    files = out.splitlines()[1:]
    assert len(files) == 9 and "  gpt2-tokenizer/merges.txt  ok" in out
    # the full training split (downloaded) has no checksum on record; the offline subset does
    assert all(line.endswith(("  ok", "  ok (the offline subset: first 14,139 rows)", "(no checksum on record)"))
               for line in files), out


def test_info_reports_truncated_and_damaged_files_with_the_fix(data_copy, capsys):
    sonnets = data_copy / "sonnets.txt"
    sonnets.write_bytes(sonnets.read_bytes()[:40_000])  # an interrupted copy
    merges = data_copy / "gpt2-tokenizer" / "merges.txt"
    raw = bytearray(merges.read_bytes())
    raw[1000] ^= 1  # same size, one bit flipped
    merges.write_bytes(bytes(raw))
    assert data.main(["info"]) == 1
    lines = capsys.readouterr().out.splitlines()
    fix = "`python -m gpt2lab.data download` fetches it again"
    assert f"     40,000 bytes  sonnets.txt  truncated: 40,000 bytes, expected 81,032; {fix}" in lines
    assert f"    456,318 bytes  gpt2-tokenizer/merges.txt  damaged: sha256 differs from the download; {fix}" in lines
    assert sum("  ok" in line for line in lines) == 7
    assert data.verify("quora-dev.csv") == (True, "ok")


def test_loading_a_file_of_the_wrong_size_warns_once(data_copy, capsys):
    sonnets = data_copy / "sonnets.txt"
    text = sonnets.read_text()
    sonnets.write_text(text[: text.index("\n40\n")])  # cut at a sonnet boundary: it still parses
    assert len(data.load_sonnets("train")) == 39
    err = capsys.readouterr().err.strip()
    size = sonnets.stat().st_size
    assert "\n" not in err and f"sonnets.txt has {size:,} bytes, not 81,032 (truncated or damaged?)" in err
    assert len(data.load_sonnets("train")) == 39
    assert capsys.readouterr().err == ""  # once per file
    data.load_quora("test")
    assert capsys.readouterr().err == ""  # a file of the right size says nothing


def test_quora_file_with_non_utf8_bytes_names_the_line(data_copy):
    path = data_copy / "quora-dev.csv"
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"\t", b"\tCaf\xe9 ", 1)  # latin-1 e-acute, as a spreadsheet re-save leaves
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(data.DataError) as err:
        data.load_quora("dev")
    message = str(err.value)
    assert message.startswith("quora-dev.csv: line 3, column ") and "byte 0xe9 is not UTF-8" in message
    assert "python -m gpt2lab.data download --force" in message and "\n" not in message


def test_download_offline_is_one_line_saying_where_to_put_the_files(tmp_path, monkeypatch, capsys):
    """A real connection attempt to a closed local port: refused at once, no network involved."""
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    monkeypatch.setattr(data, "DOWNLOADS", {"sonnets.txt": data.Source("http://127.0.0.1:9/sonnets.txt", 5, None)})
    assert data.main(["download"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: network unreachable (")
    assert "fetching sonnets.txt" in err and f"copy the files into {tmp_path}" in err and "GPT2LAB_DATA" in err
    assert list(tmp_path.iterdir()) == []  # no .part left behind

    def http_404(url, timeout):
        raise data.urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(data.urllib.request, "urlopen", http_404)
    assert data.main(["download"]) == 1
    assert "sonnets.txt: the server answered HTTP 404 for http://127.0.0.1:9/sonnets.txt" in capsys.readouterr().err


class FakeResponse:
    def __init__(self, body: bytes):
        self.body = body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self):
        return self.body


def test_download_is_atomic_and_checks_sha(tmp_path, monkeypatch):
    """download() with a fake fetcher (tests never reach the network): a bad checksum keeps nothing."""
    monkeypatch.setenv("GPT2LAB_DATA", str(tmp_path))
    monkeypatch.setattr(data, "DOWNLOADS", {"a.txt": data.Source("https://example.invalid/a", 5, "0" * 64)})
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"hello"))
    with pytest.raises(data.DataError, match="a.txt: checksum mismatch"):
        data.download()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(data, "DOWNLOADS", {"sub/a.txt": data.Source("https://example.invalid/a", None, None)})
    data.download()
    assert (tmp_path / "sub" / "a.txt").read_bytes() == b"hello"


def test_download_fetches_a_truncated_file_again(data_copy, monkeypatch, capsys):
    good = (data_copy / "sonnets.txt").read_bytes()
    (data_copy / "sonnets.txt").write_bytes(good[:100])
    fetched = []
    monkeypatch.setattr(data, "DOWNLOADS", {k: data.DOWNLOADS[k] for k in ("sonnets.txt", "quora-dev.csv")})
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: fetched.append(url) or FakeResponse(good))
    data.download()
    assert fetched == [data.DOWNLOADS["sonnets.txt"].url]  # quora-dev.csv verifies: skipped
    assert (data_copy / "sonnets.txt").read_bytes() == good
    assert "[skip] quora-dev.csv (present)" in capsys.readouterr().out


def test_shown_path_is_relative_in_or_beside_the_repo(tmp_path):
    assert data.shown_path(data.REPO_ROOT / "data") == "data"
    assert data.shown_path(data.REPO_ROOT.parent / "shared" / "data") == "../shared/data"
    far = data.REPO_ROOT.parent.parent / "elsewhere" / "data"
    assert data.shown_path(far) == str(far)


def test_course_errors_render_as_one_line_in_jupyter():
    from gpt2lab.data import DataFileMissing
    from gpt2lab.tokenizer import TokenizerUnavailable
    from gpt2lab.weights import WeightsUnavailable

    for cls in (DataFileMissing, TokenizerUnavailable, WeightsUnavailable):
        lines = cls("no such thing: do this")._render_traceback_()
        assert len(lines) == 1 and lines[0].endswith(f"{cls.__name__}\x1b[0m: no such thing: do this")
        assert issubclass(cls, FileNotFoundError)  # callers that catch FileNotFoundError keep working


def test_shown_paths_are_relative_to_the_repo_or_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    assert data.shown_path(data.REPO_ROOT / "data" / "x.csv") == os.path.join("data", "x.csv")
    assert data.shown_path(tmp_path / ".cache" / "hub") == os.path.join("~", ".cache", "hub")
    assert data.shown_path(Path("/opt/elsewhere")) == "/opt/elsewhere"
