"""Text that needs no network: Python's own language reference (`pydoc_data`), split once and for all.

Every fourth topic (in sorted order) is held out for evaluation; the rest is for calibration and
training, so no compression step ever sees the text it is judged on.
"""

from __future__ import annotations

from pathlib import Path

HELD_OUT_EVERY = 4


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def eval_text() -> str:
    """The default held-out evaluation text (~115k characters)."""
    return "\n\n".join(text for i, (_, text) in enumerate(_topics()) if i % HELD_OUT_EVERY == 0)


def train_texts() -> list[str]:
    """The default calibration/training documents, disjoint from `eval_text()`."""
    return [text for i, (_, text) in enumerate(_topics()) if i % HELD_OUT_EVERY != 0]


def read_text(path: str | Path) -> str:
    """A user's text file, with a clear error when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text
