"""Rebuild python_docs.txt from the running interpreter's ``pydoc_data.topics``: the text of
sections of the Python Language Reference that CPython ships for ``help()`` (PSF License
Version 2, see README.md). The shipped file was made with CPython 3.11.7; another version's
documentation gives a slightly different text.

    python tasks/data/make_python_docs_corpus.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from pydoc_data.topics import topics

# Sections that do not contain one another (pydoc repeats sub-sections as topics of their own).
SECTIONS = ("objects", "types", "execmodel", "import", "compound", "assignment", "booleans", "truth")
ASCII = {"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u2014": "--",
         "\u2013": "-", "\u00df": "ss", "\u00b0": " degrees"}


def corpus() -> str:
    text = "\n\n".join(topics[name].rstrip() for name in SECTIONS) + "\n"
    text = "".join(ASCII.get(ch, ch) for ch in text)
    return "".join(ch for ch in text if ch == "\n" or 32 <= ord(ch) < 127)


if __name__ == "__main__":
    out = Path(__file__).with_name("python_docs.txt")
    out.write_text(corpus(), encoding="ascii")
    print(f"wrote {out} ({out.stat().st_size} bytes) from Python {sys.version.split()[0]}")
