"""Error types. A :class:`UserError` is a mistake of the caller (bad file, bad data, bad option).

The CLI prints its message on one line and exits with status 2; it never shows a traceback.
Messages name the problem and the fix, e.g. ``"calibration input 'x' has shape (3, 224) but the
model wants (N, 3, 224, 224): pass NCHW images or fix --layout"``.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the caller's input that the caller can fix."""


class PassError(RuntimeError):
    """A graph pass broke its own contract (an internal bug, not a user mistake)."""
