"""User-input errors: one line naming the field, the value and the fix (exit code 2 at the CLI)."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input from the person running unode (a recipe, a flag, a file they named)."""

    def __init__(self, field: str, value: Any, fix: str, problem: str = "invalid") -> None:
        self.field, self.value, self.fix, self.problem = field, value, fix, problem
        shown = repr(value) if not isinstance(value, str) else value
        if len(shown) > 200:
            shown = shown[:197] + "..."
        super().__init__(f"{field}: {problem} ({shown}); {fix}")
