"""
Errors reported to clients.

Plain Python objects raise these; the HTTP layer (imaged.web.ErrorPlugin) maps each class
to its status in one place, so no status code is scattered through the logic.
The message is what the client sees: it must be short, human readable and
must never contain a session id.
"""


class Error(Exception):
    """Base of errors reported to clients; `status` is the HTTP status."""

    status = 500

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class BadRequest(Error):
    status = 400


class Forbidden(Error):
    status = 403


class NotFound(Error):
    status = 404


class Conflict(Error):
    status = 409


class PayloadTooLarge(Error):
    status = 413


class RangeNotSatisfiable(Error):
    """A range outside [0, size); `size` goes into `Content-Range: */size`."""

    status = 416

    def __init__(self, message, size=None):
        super().__init__(message)
        self.size = size


class ClientGone(BadRequest):
    """The client went away or stalled mid-request; the connection is done."""


class Unsupported(Error):
    """The request is valid, but this backend or session cannot do it."""

    status = 400


class HostError(Error):
    """
    An error answer (4xx) of the host a proxy session relays to, passed on
    to the client with the host's status and message.
    """

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class BadGateway(Error):
    """The host a proxy session relays to is down or answered garbage."""

    status = 502


class ServiceUnavailable(Error):
    status = 503


class ServerError(Error):
    status = 500


class StorageError(Error):
    """I/O error on the image (EIO, ENOSPC, ...)."""

    status = 500


class Canceled(Forbidden):
    """The session was removed, expired or canceled during an operation."""
