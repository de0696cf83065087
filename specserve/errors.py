"""Errors a user can cause. Their message is one sentence that says what to do instead."""


class SpecserveError(Exception):
    """Base of every error we show to a user as one line (never a traceback)."""


class ModelLoadError(SpecserveError):
    """The model path, file or checkpoint cannot be used."""


class RequestError(SpecserveError):
    """A request is invalid (bad parameter, too long for the context or the KV pool)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
