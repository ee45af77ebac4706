"""Writing one benchmark's section into docs/BENCHMARKS.md without touching the others."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from pathlib import Path

HEADER = "# Benchmarks\n\nFigures measured with the commands shown; each section is rewritten by its own command.\n"


def machine() -> str:
    """CPU model, cores, torch build and threads: enough to know which figures compare."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    from slimserve.models.cpu_kernels import cpu_has_vnni
    from slimserve.models.loader import native_bf16

    threads = torch.get_num_threads()
    python = platform.python_version()
    # the instruction set decides which dtype and kernels are fast: figures of different ones do not compare
    isa = f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if native_bf16() else 'no'}"
    isa += f", VNNI {'yes' if cpu_has_vnni() else 'no'}"
    return f"{cpu} ({isa}), {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), Python {python}"


def today() -> str:
    return dt.date.today().isoformat()


def write_section(path: Path, key: str, body: str) -> None:
    """Replace the section between `<!-- key:start -->` and `<!-- key:end -->`, or append it."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    section = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def heading(title: str, script: str) -> list[str]:
    """A section's first lines: its title, then the command that produced it, the date and the machine."""
    return [
        title,
        "",
        f"- command: `python {script} {' '.join(sys.argv[1:])}`".rstrip(),
        f"- date: {today()}",
        f"- machine: {machine()}",
    ]


def publish(body: str, path: str | Path | None, key: str) -> None:
    """Print a section and, when a file is given, write it there as section `key`."""
    print(body)
    if path:
        write_section(Path(path), key, body)
        print(f"wrote {path}")
