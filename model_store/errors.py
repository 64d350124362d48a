"""The one error type a bad store raises: it names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """A store that cannot be served. str() reads '<file>: <problem>'."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem
