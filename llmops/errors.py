"""Errors a user can act on. The CLI prints them as one paragraph, never a traceback."""


class LLMOpsError(Exception):
    """Bad input or usage: a missing file, an invalid parameter, a malformed dataset (exit code 2)."""

    exit_code = 2


class CheckFailed(LLMOpsError):
    """A check that was the command's job did not pass, such as data validation (exit code 1)."""

    exit_code = 1
