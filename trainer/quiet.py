"""transformers without its load report and progress bars, around steps whose outcome the trainer reports itself.

A refused load or export must print exactly one `error:` line; transformers would print a table of keys and a
half-drawn progress bar to stderr before it.
"""

from __future__ import annotations

import contextlib

import transformers


@contextlib.contextmanager
def quiet_transformers():
    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
