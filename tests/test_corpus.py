"""tools/corpus.py: the embedded corpus as a file gives dilo's default tokens; other sources are
whole distinct text files sampled to the budget, written in path order, with a manifest."""

import gzip
import hashlib
import json

import numpy as np
import pytest

from dilo.data import load_tokens
from tools import corpus


def test_the_embedded_corpus_file_trains_on_the_same_tokens_as_the_default(tmp_path):
    out = tmp_path / "stdlib.txt"
    m = corpus.write_corpus("embedded", out, 300_000)
    assert m["bytes"] == out.stat().st_size >= 300_000 and m["bytes"] - 300_000 < 4
    assert m["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    for budget in (300_000, 123_457):
        for frac in (0.0, 0.05):
            mine, default = load_tokens(str(out), budget, frac), load_tokens("", budget, frac)
            assert all(np.array_equal(a, b) for a, b in zip(mine, default))
    assert json.loads((tmp_path / "stdlib.txt.json").read_text())["files"][0]["name"].endswith(".py")


def test_an_embedded_cut_inside_a_character_is_completed(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    root.mkdir()
    (root / "a.py").write_text("x = 'é'\n")  # é is 2 bytes: offsets 5, 6
    (root / "b.py").write_text("y = 1\n")
    monkeypatch.setattr(corpus, "embedded_corpus_files", lambda: [root / "a.py", root / "b.py"])
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    blob, taken = corpus.embedded_stream(6)
    assert blob == "x = 'é".encode() and [n for n, _ in taken] == ["a.py"]
    assert corpus.embedded_stream(0)[0] == "x = 'é'\n\ny = 1\n".encode()


def test_a_folder_source_is_whole_distinct_text_files_in_path_order(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    texts = {f"f{i:02d}.txt": f"file {i} ".encode() * (i + 3) for i in range(20)}
    for name, text in texts.items():
        (src / name).write_bytes(text)
    (src / "sub" / "copy.txt").write_bytes(texts["f03.txt"])          # a duplicate: taken once
    (src / "sub" / "page.1.gz").write_bytes(gzip.compress(b"a gzip page\n"))  # decompressed
    (src / "bin.dat").write_bytes(b"\x00\x01\x02")                     # not text: skipped
    (src / "link.txt").symlink_to(src / "f05.txt")                      # not followed
    out = tmp_path / "c.txt"
    whole = corpus.write_corpus(f"dir:{src}", out, 0)
    names = [f["name"] for f in whole["files"]]
    assert names == sorted(names) and "src/bin.dat" not in names and "src/link.txt" not in names
    assert len(names) == 21 and "src/sub/page.1.gz" in names
    assert sum(n in ("src/f03.txt", "src/sub/copy.txt") for n in names) == 1
    assert b"a gzip page\n" in out.read_bytes()
    budget = 400
    m = corpus.write_corpus(f"dir:{src}", out, budget)
    blob = out.read_bytes()
    assert len(blob) == m["bytes"] <= budget and m["bytes"] > budget - 40
    pieces = blob.split(b"\n")
    assert len(pieces) == m["num_files"]  # whole files, joined with "\n"
    assert m == corpus.write_corpus(f"dir:{src}", tmp_path / "again.txt", budget)  # deterministic
    train, _ = load_tokens(str(out), 0, 0.0)
    assert bytes(train.astype(np.uint8)) == blob


def test_bad_sources_and_budgets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        corpus.write_corpus("wikipedia", tmp_path / "x.txt", 100)
    with pytest.raises(ValueError, match="no files under"):
        corpus.write_corpus(f"dir:{tmp_path / 'nothing'}", tmp_path / "x.txt", 100)
    with pytest.raises(ValueError, match="--max-bytes"):
        corpus.write_corpus("embedded", tmp_path / "x.txt", -1)
