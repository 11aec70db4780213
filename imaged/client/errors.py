"""
Errors of the client library, each with the exit code the CLI uses for it.

Expected failures (a refused session, a lost connection, a checksum
mismatch) are ClientError subclasses with a one-line message; the CLI prints
the message and exits with `exit_code`, never a traceback. Messages must not
contain the image URL: its last component is the secret session id.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_FORBIDDEN = 3
EXIT_OUT_OF_RANGE = 4
EXIT_CONNECTION = 5
EXIT_VERIFY = 6
EXIT_INTERRUPTED = 130


class ClientError(Exception):
    """Base of the client's expected failures."""

    exit_code = EXIT_ERROR


class UsageError(ClientError):
    """Options that do not go together."""

    exit_code = EXIT_USAGE


class UnsupportedError(ClientError):
    """The server (or the session) cannot do what was asked."""


class HTTPError(ClientError):
    """The server answered an error status; `status` is the HTTP status."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class ForbiddenError(HTTPError):
    """403: unknown, expired or canceled session, or operation not allowed."""

    exit_code = EXIT_FORBIDDEN


class OutOfRangeError(HTTPError):
    """416, or a local file that does not fit in the image."""

    exit_code = EXIT_OUT_OF_RANGE


class ConnectionLostError(ClientError):
    """Cannot connect, or the connection broke during a request."""

    exit_code = EXIT_CONNECTION


class TransferTimeout(ConnectionLostError):
    """The server did not answer or accept data within the timeout."""


class VerifyError(ClientError):
    """The server's checksum differs from the local one."""

    exit_code = EXIT_VERIFY

    def __init__(self, message, local=None, remote=None):
        super().__init__(message)
        self.local = local
        self.remote = remote
