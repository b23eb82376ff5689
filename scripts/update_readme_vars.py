#!/usr/bin/env python3
"""Rewrite README.md's variable table from lib/config.py's VARS (tests check it is current)."""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.config import markdown_table  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- vars:start -->", "<!-- vars:end -->"


def rendered(text: str) -> str:
    return re.sub(re.escape(START) + ".*?" + re.escape(END), START + "\n" + markdown_table() + "\n" + END, text,
                  flags=re.S)


if __name__ == "__main__":
    README.write_text(rendered(README.read_text()))
