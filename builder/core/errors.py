"""The one error type for user mistakes: caught once in the CLI, printed with what would work, exit code 2."""

from __future__ import annotations


class SameboxError(Exception):
    """A user mistake or an unmet precondition: says what is wrong and what would work.

    ``problems`` holds every problem found when validation collects more than one.
    """

    def __init__(self, message: str, hint: str = "", problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.problems = list(problems or [])

    def __str__(self) -> str:
        lines = [self.message]
        lines += [f"  - {p}" for p in self.problems]
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)
