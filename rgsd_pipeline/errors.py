"""The one base class of errors a user can fix from the message alone.

The command line prints a UserError as one red line and exits with status 2, without a traceback
(set RGSD_TRACEBACK=1 to see one). Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or settings; the message says where and what to do."""


class ArtifactError(UserError, RuntimeError):
    """A stage output is missing, incomplete, corrupt or made from other inputs than asked for."""
