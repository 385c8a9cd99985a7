"""Exceptions that the command line and the Slicer module turn into one clear line each."""


class USBError(Exception):
    """Base class of every error USBLib raises on purpose."""


class InputError(USBError, ValueError):
    """The user's input (file, mask, setting) cannot be used. The CLI exits with code 2."""


class BundleError(USBError):
    """A model bundle is missing, incomplete, tampered with or of an unknown schema (exit code 2)."""


class Cancelled(USBError):
    """The run was cancelled by the progress callback or by Ctrl-C; nothing was written."""


class OutputError(USBError):
    """An output cannot be written (full disk, read-only or forbidden folder): the user's environment, not an
    internal failure. The CLI exits with code 2 and names the output the user asked for."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``kill``), handled exactly as Ctrl-C: clean up, write nothing."""
