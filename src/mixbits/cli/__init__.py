"""The command line: one subcommand per stage. Every flag is a config field; the work is in
`pipeline` and the stage packages. Errors from bad input are printed as one line with the fix,
exit code 2."""

from mixbits.cli.common import app
from mixbits.cli import analyze, classify, experiments, export, report, run, train, zeroshot  # noqa: E402,F401  (importing registers the commands)

__all__ = ["app"]
