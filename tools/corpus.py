"""Write a text corpus file, deterministically, from what this machine holds (no network).

    python tools/corpus.py man docs/corpus-man.txt --max-bytes 16000000
    python tools/corpus.py embedded /tmp/stdlib.txt          # dilo's default corpus, as bytes
    python tools/corpus.py dir:/some/folder /tmp/folder.txt --max-bytes 8000000

Then train on it with `--data.path FILE` (and `--data.max_bytes` no larger than the file).
dilo reads a file's first data.max_bytes bytes, and the file is in path order, so write it
with --max-bytes equal to the run's data.max_bytes (or set data.max_bytes 0) to train on a
sample of the whole source rather than the head of its alphabet.
Next to FILE goes FILE.json: the source, the Python version, the byte budget, the files taken
(relative name, bytes), the total bytes and the file's sha256, so another machine can check
it has the same corpus.

Sources:
  embedded  dilo's default corpus (`data.path = ""`): this Python's standard-library `.py`
            files as dilo.data reads them, joined with "\\n" in path order. The file holds
            the first --max-bytes bytes of that stream (0 = all of it; a cut inside a UTF-8
            character is completed), so `--data.path FILE --data.max_bytes M` trains on
            exactly the tokens `data.path = ""` gives with `data.max_bytes M` for any M up to
            --max-bytes, on a machine with another Python version too.
  man       the English manual pages (/usr/share/man/man1 .. man9; gzip ones decompressed):
            troff markup around English prose, a corpus of another kind than Python code.
            One-line `.so` redirects are left out.
  headers   C and C++ headers under /usr/include (every text file there).
  docs      /usr/share/doc and /usr/share/info (text, gzip ones decompressed).
  dir:PATH  every text file under PATH (gzip ones decompressed).

For every source but `embedded`: symlinks are not followed, files that are not UTF-8 text
(or hold NUL bytes) are skipped, a file whose content equals an earlier one's is taken once
(duplicates would land in both training and held-out blocks), and the budget is filled by
whole files taken in the order of sha256(relative name) — a sample spread over the whole
source rather than its alphabetical head — then written in path order (as dilo sorts a
folder, so `data.layout = contiguous` still gives workers shards of different kinds).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dilo.data import _is_text, embedded_corpus_files  # noqa: E402

SOURCES = {
    "man": [Path("/usr/share/man") / f"man{i}" for i in range(1, 10)],
    "headers": [Path("/usr/include")],
    "docs": [Path("/usr/share/doc"), Path("/usr/share/info")],
}


def embedded_stream(max_bytes: int) -> tuple[bytes, list[tuple[str, int]]]:
    """The embedded corpus's first `max_bytes` bytes (0 = all), completed to a whole character."""
    files = embedded_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, taken, size = [], [], 0
    for f in files:
        raw = f.read_bytes()
        parts.append(raw)
        taken.append((f.relative_to(root).as_posix(), len(raw)))
        size += len(raw) + 1
        if max_bytes and size >= max_bytes:
            break
    blob = b"\n".join(parts)
    if max_bytes and len(blob) > max_bytes:
        end = max_bytes
        while end < len(blob) and (blob[end] & 0xC0) == 0x80:  # a continuation byte: finish the char
            end += 1
        blob = blob[:end]
    return blob, taken


def read_text(path: Path) -> bytes | None:
    """The file's text (decompressed if .gz), or None if it is not UTF-8 text."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return raw if raw and _is_text(raw) else None


def candidates(roots: list[Path]) -> list[tuple[str, Path]]:
    """(name, path) of the regular files under `roots` (symlinks not followed), by name."""
    out = []
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for f in filenames:
                p = Path(dirpath, f)
                if not p.is_symlink() and p.is_file():
                    out.append((f"{root.name}/{p.relative_to(root).as_posix()}", p))
    return sorted(out)


def sampled(roots: list[Path], max_bytes: int, skip_so: bool) -> tuple[bytes, list[tuple[str, int]]]:
    """Whole text files, distinct in content, taken in sha256(name) order while they fit the
    budget (0 = all), joined with "\\n" in name order."""
    files = candidates(roots)
    if not files:
        raise ValueError(f"no files under {', '.join(map(str, roots))}; this machine lacks that "
                         "source, pick another (see --help)")
    order = sorted(files, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())
    seen, taken, size = set(), [], 0
    for name, path in order:
        text = read_text(path)
        if text is None or (skip_so and text.startswith(b".so ") and text.count(b"\n") <= 1):
            continue
        digest = hashlib.sha256(text).digest()
        if digest in seen:
            continue
        cost = len(text) + (1 if taken else 0)
        if max_bytes and size + cost > max_bytes:
            continue  # too big for what is left; a smaller file may still fit
        seen.add(digest)
        taken.append((name, text))
        size += cost
        if max_bytes and size >= max_bytes:
            break
    taken.sort(key=lambda item: item[0])
    return b"\n".join(text for _, text in taken), [(name, len(text)) for name, text in taken]


def write_corpus(source: str, out: Path, max_bytes: int) -> dict:
    """Write the corpus and its manifest (out + ".json"); return the manifest."""
    if max_bytes < 0:
        raise ValueError(f"--max-bytes must be >= 0 (0 = the whole source), got {max_bytes}")
    if source == "embedded":
        blob, taken = embedded_stream(max_bytes)
    elif source in SOURCES:
        blob, taken = sampled(SOURCES[source], max_bytes, skip_so=source == "man")
    elif source.startswith("dir:"):
        blob, taken = sampled([Path(source[4:])], max_bytes, skip_so=False)
    else:
        raise ValueError(f"unknown source {source!r}; use embedded, {', '.join(SOURCES)} or dir:PATH")
    if not blob:
        raise ValueError(f"source {source!r} gave no text within --max-bytes {max_bytes}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(blob)
    manifest = {"source": source, "python": platform.python_version(), "max_bytes": max_bytes,
                "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                "num_files": len(taken), "files": [{"name": n, "bytes": b} for n, b in taken]}
    Path(str(out) + ".json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("source", help="embedded, man, headers, docs or dir:PATH")
    parser.add_argument("out", type=Path, help="the corpus file to write (its manifest: OUT.json)")
    parser.add_argument("--max-bytes", type=int, default=16_000_000,
                        help="byte budget (default 16000000; 0 = the whole source)")
    args = parser.parse_args(argv)
    try:
        m = write_corpus(args.source, args.out, args.max_bytes)
    except ValueError as e:
        parser.error(str(e))
    print(f"{args.out}: {m['bytes']} bytes from {m['num_files']} files of {m['source']}, "
          f"sha256 {m['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
