"""Compressed data files (.gz, .bz2, .xz, .zst) read as their plain form, everywhere data is read;
and .json files holding one JSON array of records.

Each compressed case is compared with the same file uncompressed, so a reader that ignores the
compression (or guesses the format from the last suffix) fails here.
"""

from __future__ import annotations

import bz2
import sys
import gzip
import json
import lzma
from pathlib import Path

import pytest

from hmcl_cli.data.prepare import load_graded, prepare
from hmcl_cli.errors import DataError
from hmcl_cli.io_utils import data_stem, data_suffix, find_data_file
from hmcl_cli.mining import read_corpus
from hmcl_cli.recipe import load_recipe


def _zstd(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": _zstd}

GRADED = "".join(json.dumps(r) + "\n" for r in [
    {"query": "how do refunds work", "pos": ["Refunds reach your card in 5-10 days."],
     "weak": ["Request a refund from the order page."], "neg": ["We ship to 40 countries."]},
    {"query": "ünïcode quëry", "pos": ["ça va"], "neg": ["no"]},
])
STS = "\ufeffsentence1,sentence2,score\na cat,a kitten,4.5\nrain,sunshine,0.5\nbus,coach,3.0\n"


def _recipe(tmp_path: Path, sources: list[dict], **data):
    return load_recipe(data={
        "name": "prep", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": "unused"},
        "data": {"sources": sources, **data},
    })


def _prepared(tmp_path: Path, source: dict) -> list[dict]:
    """The prepared train rows, less the `source` label (the file's name, which differs)."""
    prepare(_recipe(tmp_path, [source]), progress=False)
    lines = (tmp_path / "run" / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "source"} for line in lines]


def _write(path: Path, text: str, suffix: str) -> Path:
    out = path.with_name(path.name + suffix)
    out.write_bytes(COMPRESS[suffix](text.encode("utf-8")))
    return out


def test_format_is_read_past_the_compression_suffix():
    assert data_suffix("a/train.jsonl.gz") == ".jsonl"
    assert data_suffix("sts.CSV.XZ") == ".csv"
    assert data_suffix("pairs.tsv") == ".tsv"
    assert data_suffix("archive.gz") == ""
    assert data_stem("dev.jsonl.gz") == "dev" == data_stem("dev.jsonl")  # eval task names


@pytest.mark.parametrize("suffix", list(COMPRESS))
@pytest.mark.parametrize("kind", ["graded", "sts"])
def test_compressed_source_prepares_exactly_as_the_plain_file(tmp_path, suffix, kind):
    text, name, fmt = (GRADED, "g.jsonl", "graded") if kind == "graded" else (STS, "s.csv", "sts")
    plain = tmp_path / name
    plain.write_text(text, encoding="utf-8")
    expected = _prepared(tmp_path, {"path": str(plain), "format": fmt, "split": "train"})
    packed = _write(plain, text, suffix)
    got = _prepared(tmp_path, {"path": str(packed), "format": fmt, "split": "train"})
    assert got == expected and len(expected) == (2 if kind == "graded" else 3)
    # the graded loader (train/dev of a run, --reranking files) reads it too
    if kind == "graded":
        assert [e.query for e in load_graded(packed)] == [e.query for e in load_graded(plain)]


def _beir(folder: Path, compress: dict[str, str]) -> Path:
    (folder / "qrels").mkdir(parents=True)
    files = {
        "corpus.jsonl": "".join(json.dumps({"_id": k, "title": t, "text": x}) + "\n" for k, t, x in [
            ("d1", "Refunds", "Money back within 30 days."), ("d2", "", "Shipping takes a week."),
            ("d3", "", "Return labels are free."), ("d4", "", "An unjudged document.")]),
        "queries.jsonl": json.dumps({"_id": "q1", "text": "how do I get a refund"}) + "\n"
        + json.dumps({"_id": "q2", "text": "when will my parcel arrive"}) + "\n",
        "qrels/train.tsv": "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td2\t2\n",
    }
    for name, text in files.items():
        if name in compress:
            _write(folder / name, text, compress[name])
        else:
            (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_beir_folder_with_compressed_files_reads_as_the_plain_one(tmp_path):
    plain = _beir(tmp_path / "plain", {})
    packed = _beir(tmp_path / "packed", {"corpus.jsonl": ".gz", "queries.jsonl": ".bz2", "qrels/train.tsv": ".xz"})
    assert find_data_file(packed, "corpus.jsonl").name == "corpus.jsonl.gz"
    expected = _prepared(tmp_path, {"path": str(plain), "format": "qrels", "split": "train"})
    assert _prepared(tmp_path, {"path": str(packed), "format": "qrels", "split": "train"}) == expected
    assert expected[0]["pos"] == ["Refunds Money back within 30 days."]
    # mining and retrieval eval read the whole corpus, unjudged documents included
    assert read_corpus(packed) == read_corpus(plain) and len(read_corpus(plain)) == 4


def test_beir_folder_missing_a_file_names_it(tmp_path):
    folder = _beir(tmp_path / "b", {"corpus.jsonl": ".gz"})
    (folder / "queries.jsonl").unlink()
    with pytest.raises(DataError, match="needs queries.jsonl"):
        prepare(_recipe(tmp_path, [{"path": str(folder), "format": "qrels", "split": "train"}]), progress=False)


@pytest.mark.parametrize("on_error", ["fail", "skip"])
@pytest.mark.parametrize("suffix", list(COMPRESS))
def test_cut_short_compressed_file_is_an_error_naming_the_line_and_writes_nothing(tmp_path, suffix, on_error):
    """Even with `on_error: skip`: the rows past the cut are lost, which must not pass quietly."""
    rows = "".join(f"sentence {i} a,sentence {i} b,{i % 5}.0\n" for i in range(40000))  # > 1 bz2 block
    whole = COMPRESS[suffix](rows.encode())
    path = tmp_path / f"sts.csv{suffix}"
    path.write_bytes(whole[: len(whole) * 4 // 5])  # past the first bz2 block
    with pytest.raises(DataError) as err:
        prepare(_recipe(tmp_path, [{"path": str(path), "format": "sts", "split": "train"}], on_error=on_error),
                progress=False)
    text = str(err.value)
    assert f"{path}:" in text and "corrupt or cut short after line" in text, text
    line = int(text.split(f"{path}:")[1].split(":")[0])
    assert 1 < line < 40000  # the line where the data stops, not line 1 nor the whole file
    assert not (tmp_path / "run" / "data" / "train.jsonl").exists()


def test_not_actually_gzip_is_an_error_not_a_traceback(tmp_path):
    path = tmp_path / "g.jsonl.gz"
    path.write_text(GRADED, encoding="utf-8")
    with pytest.raises(DataError, match=r"g\.jsonl\.gz:1: the \.gz data is corrupt"):
        prepare(_recipe(tmp_path, [{"path": str(path), "format": "graded", "split": "train"}]), progress=False)


@pytest.mark.parametrize("installed", [False, True])
def test_zst_without_zstandard_says_what_to_install(tmp_path, monkeypatch, installed):
    """Not installed: install it. Installed but failing to import (a build for another numpy, a
    missing library): the import's error, and upgrade it (installing would keep the broken one)."""
    path = tmp_path / "g.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd")
    if installed:
        fake = tmp_path / "site" / "zstandard"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('zstd backend: libzstd.so.1: cannot open shared object file')\n")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        monkeypatch.delitem(sys.modules, "zstandard", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "zstandard", None)  # what Python does for a package that is absent
    with pytest.raises(DataError) as err:
        prepare(_recipe(tmp_path, [{"path": str(path), "format": "graded", "split": "train"}]), progress=False)
    msg = str(err.value)
    assert "g.jsonl.zst: reading a .zst file needs" in msg
    if installed:
        assert "installed but failed to import (ImportError: zstd backend: libzstd.so.1" in msg, msg
        assert "pip install --upgrade zstandard, or decompress the file (zstd -d)" in err.value.hint
        assert "numpy" in err.value.hint
    else:
        assert "the zstandard package, which is not installed" in msg and "pip install zstandard" in err.value.hint


def test_corpus_text_file_compressed_and_bad_corpus_lines(tmp_path):
    plain = tmp_path / "docs.txt"
    plain.write_text("first document\r\n\nsecond document\n", encoding="utf-8")
    assert read_corpus(_write(plain, plain.read_text(encoding="utf-8"), ".gz")) == ["first document", "second document"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt:2: not UTF-8"):
        read_corpus(latin)
    listed = tmp_path / "c.jsonl"
    listed.write_text('{"text": "fine"}\n["a list"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:2: expected a JSON object"):
        read_corpus(listed)
    listed.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl:2: invalid JSON"):
        read_corpus(listed)
    assert read_corpus(latin, "latin-1") == ["ok", "café"]
    utf16 = tmp_path / "docs16.jsonl.gz"  # compressed UTF-16 JSON Lines
    import gzip

    utf16.write_bytes(gzip.compress('{"title": "Café", "text": "ouvert"}\n{"text": "fermé"}\n'.encode("utf-16")))
    assert read_corpus(utf16, "utf-16") == ["Café ouvert", "fermé"]
    array = tmp_path / "docs.json"  # a JSON array corpus
    array.write_text(json.dumps([{"title": "Refunds", "text": "Money back."}, {"text": "Ships in a week."}], indent=2))
    assert read_corpus(array) == ["Refunds Money back.", "Ships in a week."]


# ------------------------------------------------------------------------------------------
# a .json file holding one JSON array of records (not JSON Lines)
# ------------------------------------------------------------------------------------------

RECORDS = [{"query": f"question {i}", "pos": [f"answer {i}"], "neg": [f"other {i}"]} for i in range(6)]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_json_array_file_prepares_as_the_same_records_in_jsonl(tmp_path, suffix):
    lines = tmp_path / "g.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    expected = _prepared(tmp_path, {"path": str(lines), "format": "graded", "split": "train"})
    array = tmp_path / "g.json"
    array.write_text("\ufeff  " + json.dumps(RECORDS, indent=2), encoding="utf-8")
    if suffix:
        array = _write(array, array.read_text(encoding="utf-8"), suffix)
    assert _prepared(tmp_path, {"path": str(array), "format": "graded", "split": "train"}) == expected
    assert len(expected) == 6
    # JSON Lines named .json still read line by line
    named = tmp_path / "lines.json"
    named.write_text(lines.read_text(encoding="utf-8"), encoding="utf-8")
    assert _prepared(tmp_path, {"path": str(named), "format": "graded", "split": "train"}) == expected


def test_json_array_errors_name_the_line(tmp_path):
    rows = [dict(r) for r in RECORDS]
    rows[3] = {"query": "question 3", "pos": ["answer 3"], "neg": ["other 3"], "postive": ["typo"]}
    text = json.dumps(rows, indent=2)
    start = text.splitlines().index("  {", text.splitlines().index('    "query": "question 2",'))  # record 3's `{`
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as err:  # a record the graded reader refuses: the line it starts on
        prepare(_recipe(tmp_path, [{"path": str(path), "format": "graded", "split": "train"}]), progress=False)
    assert f"{path}:{start + 1}:" in str(err.value) and "postive" in str(err.value)
    broken = text.replace('"question 4"', "question 4")
    bad_line = broken.splitlines().index('    "query": question 4,') + 1
    path.write_text(broken, encoding="utf-8")
    with pytest.raises(DataError) as err:  # broken JSON: nothing after it can be read, so even `skip` stops
        prepare(_recipe(tmp_path, [{"path": str(path), "format": "graded", "split": "train"}], on_error="skip"),
                progress=False)
    assert f"{path}:{bad_line}: invalid JSON" in str(err.value)
    clean = json.dumps(RECORDS, indent=2)
    path.write_text(clean[: clean.rindex("]")], encoding="utf-8")
    with pytest.raises(DataError, match="not closed"):
        prepare(_recipe(tmp_path, [{"path": str(path), "format": "graded", "split": "train"}]), progress=False)


# ------------------------------------------------------------------------------------------
# text encodings other than UTF-8 (`encoding` of a source or eval task)
# ------------------------------------------------------------------------------------------

ACCENTED = "sentence1,sentence2,score\ncafé au lait,un café,4.5\nnaïve,simple,1.0\nZürich,Genève,3.0\n"


@pytest.mark.parametrize("encoding,suffix", [("cp1252", ""), ("latin-1", ".gz"), ("utf-16", "")])
def test_source_in_another_encoding_reads_as_its_utf8_copy(tmp_path, encoding, suffix):
    plain = tmp_path / "s.csv"
    plain.write_text(ACCENTED, encoding="utf-8")
    expected = _prepared(tmp_path, {"path": str(plain), "format": "sts", "split": "train"})
    other = tmp_path / f"other.csv{suffix}"
    data = ACCENTED.encode(encoding)
    other.write_bytes(COMPRESS[suffix](data) if suffix else data)
    source = {"path": str(other), "format": "sts", "split": "train"}
    if encoding != "utf-16":  # read as UTF-8, the accented bytes are bad rows that point to `encoding`
        with pytest.raises(DataError, match=r"other\.csv(\.gz)?:2: not UTF-8 text .*set the source's `encoding`"):
            prepare(_recipe(tmp_path, [source]), progress=False)
    assert _prepared(tmp_path, {**source, "encoding": encoding}) == expected and len(expected) == 3


def test_json_array_in_another_encoding_and_undecodable_text(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(json.dumps([{"query": "café", "pos": ["un café"]}], ensure_ascii=False).encode("cp1252"))
    rows = _prepared(tmp_path, {"path": str(path), "format": "graded", "split": "train", "encoding": "cp1252"})
    assert rows[0]["query"] == "café"
    latin = tmp_path / "l.csv"
    latin.write_bytes(ACCENTED.encode("latin-1"))
    with pytest.raises(DataError, match=r"l\.csv:2: not ascii text"):
        prepare(_recipe(tmp_path, [{"path": str(latin), "format": "sts", "split": "train", "encoding": "ascii"}]),
                progress=False)
    from hmcl_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown text encoding 'latin9x'"):
        _recipe(tmp_path, [{"path": str(latin), "format": "sts", "encoding": "latin9x"}])


def test_graded_loader_names_the_bad_line(tmp_path):
    """load_graded (a run's train/dev files) reads through the sources' JSON reader."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"query": "a", "pos": ["b"]}\n{"query": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl:2: invalid JSON"):
        load_graded(path)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_json_array_read_in_small_pieces_gives_every_record_at_its_line(tmp_path, monkeypatch, chunk):
    """The array is read a piece at a time: records, numbers and strings cut at a piece's end
    parse whole, and each record keeps the line it starts on."""
    from hmcl_cli.data import readers

    monkeypatch.setattr(readers, "_ARRAY_CHUNK", chunk)
    records = [{"query": f"question {i} é", "pos": [f"answer {i}"], "n": 12345 + i} for i in range(5)] + [7, "text"]
    text = "\ufeff[\n" + ",\n\n".join(json.dumps(r, indent=1, ensure_ascii=False) for r in records) + "\n]\n"
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    got = list(readers.json_records(path))
    assert [r for _, r in got] == records
    lines = text.splitlines()
    starts = [i + 1 for i, ln in enumerate(lines) if ln == "{" or ln.rstrip(",") in ("7", '"text"')]
    assert [n for n, _ in got] == starts
    broken = path.with_name("b.json")
    broken.write_text(text.replace('"question 3 é"', "question 3"), encoding="utf-8")
    bad_line = lines.index(' "query": "question 3 é",') + 1
    with pytest.raises(DataError, match=rf"b.json:{bad_line}: invalid JSON"):
        list(readers.json_records(broken))


def test_json_array_memory_is_the_records_in_flight_not_the_file(tmp_path):
    """A 24 MB JSON array read record by record holds about a megabyte at a time (before, the
    whole text: peak ~ the file's size and more)."""
    import tracemalloc

    from hmcl_cli.data import readers

    path = tmp_path / "big.json"
    record = {"query": "q" * 200, "pos": ["p" * 1000], "neg": ["n" * 1000]}
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(record) for _ in range(10_000)) + "\n]\n")
    assert path.stat().st_size > 20e6
    tracemalloc.start()
    n = sum(1 for _ in readers.json_records(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 10_000 and peak < 6e6, peak
