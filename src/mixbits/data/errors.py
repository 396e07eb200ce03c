"""The one error type of the data layer: a needed file, package, model or text is unavailable.

It subclasses `RuntimeError` so that callers which do not know it still see a failure, while the
CLI can catch it by name and print its message (which always says how to fix the problem)."""

from __future__ import annotations


class MixbitsDataError(RuntimeError):
    """A model, text or package could not be found or fetched; the message names the fix."""
