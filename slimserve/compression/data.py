"""Text that needs no network: Python's own language reference (`pydoc_data`), split once and for all,
and the docstrings of the standard library.

Every fourth topic (in sorted order) is held out for evaluation; the rest is for calibration and
training, so no compression step ever sees the text it is judged on.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Callable
from pathlib import Path

HELD_OUT_EVERY = 4
_NOT_LIBRARY = {"test", "tests", "idle_test", "site-packages", "dist-packages", "turtledemo", "pydoc_data"}


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


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """Module, class and function docstrings of the running Python's standard library (~1.3M characters
    on 3.11), tests excluded: English about programming, several times the pydoc training split, so a
    distillation run of half an hour does not repeat its text. Differs a little between Python versions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in _NOT_LIBRARY or part.startswith("test") for part in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return docs


PROMPTS = [
    "Explain what a Python list comprehension is.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I read a file line by line in Python?",
    "Give three tips for writing clear documentation.",
    "What does the `with` statement do in Python?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is the difference between a tuple and a list?",
    "Describe how a hash table works.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What is recursion? Give an example.",
    "How can I make my code run faster?",
    "What are Python decorators used for?",
    "Explain the difference between TCP and UDP.",
    "List the planets of the solar system.",
    "What is a generator in Python?",
    "How do I sort a dictionary by value?",
    "What causes the seasons on Earth?",
    "Give me a recipe for a simple tomato pasta.",
    "What is an exception and how do I handle one?",
    "Explain what machine learning is to a child.",
    "What is the boiling point of water at sea level?",
    "How do virtual environments help Python developers?",
]
"""Built-in prompts for sequence-level KD (teacher answers) and on-policy samples; no network needed."""


BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {
    "builtin:pydoc": train_texts,
    "builtin:docstrings": stdlib_docstrings,
}
"""Corpora named in `--data` / a recipe's `data:` instead of a path."""
