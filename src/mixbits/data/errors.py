"""The one error type of the data layer: a needed file, package, model or text is unavailable.

It is a `mixbits.errors.UserError` (so the CLI prints it in one line, exit 2) and still a `RuntimeError`
for callers written before UserError existed."""

from __future__ import annotations

from mixbits.errors import UserError


class MixbitsDataError(UserError, RuntimeError):
    """A model, text or package could not be found or fetched; the message names the fix."""
