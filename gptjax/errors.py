"""The one exception type users see.

Every error that a user can fix (a bad config value, a missing file, a prompt that is too
long) is raised as :class:`GptjaxError`. It subclasses ``ValueError`` so that config
validation reads naturally (``except ValueError``), and the CLI turns it into one line on
stderr and exit code 2 instead of a traceback.

Exit codes of the ``gptjax`` command: 0 done, 2 a user error (:class:`GptjaxError`),
:data:`EXIT_PEER_LOST` another process of a multi-process run died or hung, 130
interrupted (Ctrl-C).
"""

EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 3


class GptjaxError(ValueError):
    """A problem with the user's input that the message explains how to fix."""


class GptjaxWarning(UserWarning):
    """Something gptjax changed for the user, said once (the CLI prints it as one line)."""
