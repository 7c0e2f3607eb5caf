"""Rewrite the ```text synopsis blocks of README.md and docs/guide.md with the output of
scripts/cli_synopsis.py (tests/test_doc_commands.py checks they are equal)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
text = subprocess.run([sys.executable, str(REPO / "scripts" / "cli_synopsis.py")], check=True,
                      capture_output=True, text=True).stdout
for name in ("README.md", "docs/guide.md"):
    path = REPO / name
    old = path.read_text(encoding="utf-8")
    new = re.sub(r"(```text synopsis\n).*?(```)", lambda m: m.group(1) + text + m.group(2), old, flags=re.S)
    if new != old:
        path.write_text(new, encoding="utf-8")
        print(f"updated {name}")
