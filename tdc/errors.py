"""Errors users see. Every one carries a message meant to be printed as one line."""


class TdcError(Exception):
    """Base class of errors caused by user input (models, IR text, files, flags)."""


class ShapeError(TdcError):
    """An op was given inputs whose shapes, dtypes or attributes it cannot accept."""


class IRParseError(TdcError):
    """Malformed IR text; the message starts with line:column."""

    def __init__(self, message: str, line: int, col: int, source: str = "<ir>"):
        self.line, self.col, self.source = line, col, source
        super().__init__(f"{source}:{line}:{col}: {message}")


class VerifyError(TdcError):
    """A graph breaks an IR invariant (SSA, types, attributes)."""
