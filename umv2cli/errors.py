"""The one exception that user mistakes become.

Library code raises `UserError` with one line per problem: where, what, and the fix, e.g.
``sparse.topm=4096: exceeds the k_rc² = 1024 grid candidates; lower topm or raise k_rc``.
`umv2cli.cli.app` catches it once, prints ``error: …`` to stderr and exits with code 2.
Any other exception is a bug and keeps its traceback. `warn` is the one line for what was repaired or
skipped while the work went on.
"""


class UserError(Exception):
    """Bad input (config, preset, path, table). Each line of the message is one problem."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(problems))


def warn(message: str) -> None:
    """One line on stderr about something repaired or skipped that the user should know of; the work goes on."""
    import sys

    print(f"warning: {message}", file=sys.stderr)
