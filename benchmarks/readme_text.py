"""Held-out text from another domain: the long descriptions (READMEs) of the installed Python packages.

    python benchmarks/readme_text.py OUT.txt
    slimserve eval smollm2-135m-student --text OUT.txt --no-runtime --max-tokens 8192

No compression step trains on it (distillation uses pydoc_data topics and the standard library's
docstrings), so it shows how a student does away from the text it was healed on. The text depends on
the packages installed; compare variants on the same file.
"""

from __future__ import annotations

import sys
from email.parser import Parser
from importlib.metadata import distributions
from pathlib import Path


def readme_text(min_chars: int = 2000, max_chars: int = 6000) -> str:
    """The first `max_chars` of every package description longer than `min_chars`, sorted by package."""
    bodies = []
    for dist in sorted(distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        raw = dist.read_text("METADATA")
        body = Parser().parsestr(raw).get_payload() if raw else None
        if isinstance(body, str) and len(body) > min_chars:
            bodies.append(body[:max_chars])
    return "\n\n".join(bodies)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    text = readme_text()
    Path(sys.argv[1]).write_text(text)
    print(f"wrote {len(text)} characters to {sys.argv[1]}")
