"""The typed errors that every boundary (CLI, server, Pipecat service) translates exactly once."""


class OrpheusError(Exception):
    """Base class of every error pipecat-orpheus raises on purpose."""


class ConfigError(OrpheusError):
    """A configuration value is missing or out of range; the message names the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key, self.reason = key, message


class InvalidRequest(OrpheusError):
    """One request asks for what cannot be done; the message names the field and what is allowed.

    An unknown voice, a sampling value out of range, a prompt too long for a slot.
    """

    code = "bad_request"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.reason = field, message


class ModelLoadError(OrpheusError):
    """Weights or tokenizer could not be loaded; the message says what to do about it."""


class EngineBusy(OrpheusError):
    """Every slot is taken and the wait queue is full: try again later or add capacity."""

    code = "busy"


class EngineClosed(OrpheusError):
    """The engine was closed (shutdown): it takes no more requests."""


class EngineFailed(OrpheusError):
    """The engine could not finish a request: a step failed, or the engine core process died."""

    code = "internal"


class RequestCancelled(OrpheusError):
    """The request was cancelled (barge-in, disconnect) before it finished."""


class ProtocolError(OrpheusError):
    """A client message is malformed or breaks a limit; becomes `Error{code}` on the wire."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


class AuthError(OrpheusError):
    """The server refused the API key (or none was given where one is required)."""

    code = "auth"
