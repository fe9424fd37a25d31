"""Write docs/optimizers.md from learnopt.optim.registry.OPTIMIZERS (the table stays in sync
with the catalogue; tests/test_registry.py checks the committed file against it).

    python scripts/optimizer_table.py            # write docs/optimizers.md
    python scripts/optimizer_table.py --check    # exit 1 if docs/optimizers.md is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

from learnopt.optim.registry import markdown_table

OUT = Path(__file__).resolve().parent.parent / "docs" / "optimizers.md"


def main(argv: list[str]) -> int:
    text = markdown_table()
    if "--check" in argv:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python scripts/optimizer_table.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
