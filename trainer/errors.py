"""User-facing errors: one line that names the problem and the fix, exit code 2.

Everything a user can get wrong (recipe, data, checkpoint, CLI, mesh) raises `UserError`; the CLI prints
`error: <message>` on one line and exits with `EXIT_USER_ERROR`. Bugs stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input. `str(err)` is a single line: what is wrong, then how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        message = problem.rstrip(".") + (f"; {fix.rstrip('.')}" if fix else "")
        super().__init__(" ".join(message.split()))  # always one line
        self.problem = problem
        self.fix = fix
