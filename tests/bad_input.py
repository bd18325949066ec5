"""The one check every bad-input test makes: `refused(args, inputs, root, match=…)`.

A refusal is clean when posthoc exits with a status ≠ 0, shows exactly one line (`error: …`, progress bars
erased), raises no traceback, leaves nothing new below `root` (no output, no staging directory, no temp
file, no parent folder of a refused output) and every input is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from click.testing import CliRunner
from posthoc.cli import main


def tree_digest(path: Path) -> str:
    """Hash of every file's path, size and bytes below a directory (or of one file): inputs must not change."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def listing(root: Path) -> set[str]:
    """Every path below `root` (files, folders, links), relative."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def terminal_text(stream: str) -> str:
    """What a terminal shows: each line after its last carriage return (an erased progress bar shows nothing)."""
    shown = [line.rsplit("\r", 1)[-1] for line in stream.split("\n")]
    return "\n".join(line for line in shown if line.strip())


def refused(args: Sequence[object], inputs: Iterable[Path], root: Path, *, match: str | Sequence[str] = (),
            env: dict[str, str] | None = None) -> str:
    """Run `posthoc ARGS` in process and assert a clean refusal (see the module docstring); the `error:` line
    must contain every string of `match`. Returns that line."""
    inputs = [Path(p) for p in inputs]
    before = {p: tree_digest(p) for p in inputs}
    present = listing(root)
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)
    message = terminal_text(result.stderr)
    assert result.exit_code not in (0, None), f"exit {result.exit_code}: {result.output}"
    assert len(message.splitlines()) == 1 and message.startswith("error: "), message
    for text in [match] if isinstance(match, str) else match:
        assert text in message, message
    assert "Traceback" not in result.output, result.output
    assert listing(root) - present == set(), f"left behind: {sorted(listing(root) - present)}"
    assert {p: tree_digest(p) for p in inputs} == before, "an input was modified"
    return message


def no_code_run_marker(root: Path) -> tuple[Path, object]:
    """(marker, payload): pickling `payload` gives a file that, if unpickled, creates `marker`."""
    marker = root / "code-was-run"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return marker, Payload()
