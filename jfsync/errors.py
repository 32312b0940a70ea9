"""The jfsync exception tree and the one classifier that says whether an error is worth retrying.

::

    JfsyncError
    ├── ConfigError                 invalid configuration (one line per problem)
    └── ServerError                 anything that went wrong talking to one Jellyfin server
        ├── TransportError          the request did not get an HTTP answer (retryable)
        │   ├── UnreachableError    connection refused, DNS, reset
        │   └── RequestTimeoutError no answer within the timeout
        ├── HttpStatusError         an HTTP answer with an error status
        │   ├── AuthRejectedError   401 / 403 (retry slowly after re-minting a token)
        │   ├── NotFoundError       404 (permanent for that item)
        │   ├── BadRequestError     400 / 415 / other 4xx (permanent)
        │   ├── RateLimitedError    429 (retryable)
        │   └── ServerSideError     5xx (retryable)
        ├── BadResponseError        a 2xx body that does not parse (names route and field)
        └── UnsupportedServerError  a server version jfsync cannot work with (10.8)

Messages never carry secrets: URLs are logged without query strings that could hold keys, and
headers are never included.
"""

from __future__ import annotations


class JfsyncError(Exception):
    """Root of every error jfsync raises on purpose."""


class ConfigError(JfsyncError):
    """The configuration is invalid; ``problems`` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class ServerError(JfsyncError):
    """Something went wrong talking to the Jellyfin server named ``server``."""

    def __init__(self, server: str, message: str) -> None:
        self.server = server
        super().__init__(f"[{server}] {message}")


class TransportError(ServerError):
    """The request got no HTTP answer."""


class UnreachableError(TransportError):
    """The server could not be reached (refused, reset, name not found)."""


class RequestTimeoutError(TransportError):
    """The server did not answer in time."""


class HttpStatusError(ServerError):
    """The server answered with an error status."""

    def __init__(self, server: str, method: str, route: str, status: int, detail: str = "") -> None:
        self.method = method
        self.route = route
        self.status = status
        self.detail = detail
        text = f"{method} {route} -> HTTP {status}"
        if detail:
            text += f": {detail}"
        super().__init__(server, text)


class AuthRejectedError(HttpStatusError):
    """401 or 403: the token is unknown, revoked, or not allowed to do this."""


class NotFoundError(HttpStatusError):
    """404: the user or item does not exist on that server (or is not visible)."""


class BadRequestError(HttpStatusError):
    """400, 415 or another 4xx: the server refused the request as malformed."""


class RateLimitedError(HttpStatusError):
    """429: the server asks us to slow down."""


class ServerSideError(HttpStatusError):
    """5xx: the server failed."""


class BadResponseError(ServerError):
    """A successful answer whose body does not have the expected shape."""

    def __init__(self, server: str, route: str, problem: str) -> None:
        self.route = route
        self.problem = problem
        super().__init__(server, f"unexpected response from {route}: {problem}")


class UnsupportedServerError(ServerError):
    """The server runs a Jellyfin version jfsync cannot sync (10.8 has no user-data write route)."""


def error_for_status(
    server: str, method: str, route: str, status: int, detail: str = ""
) -> HttpStatusError:
    """Build the HttpStatusError subclass that matches ``status``."""
    cls: type[HttpStatusError]
    if status in (401, 403):
        cls = AuthRejectedError
    elif status == 404:
        cls = NotFoundError
    elif status == 429:
        cls = RateLimitedError
    elif status >= 500:
        cls = ServerSideError
    else:
        cls = BadRequestError
    return cls(server, method, route, status, detail)


def is_retryable(exc: BaseException) -> bool:
    """Tell whether retrying the same request later may succeed without anyone changing it.

    Transport failures, timeouts, 429 and 5xx are retryable. Auth failures are not retryable as
    such: the caller re-mints a token or pauses with a visible reason and retries slowly. 404 and
    other 4xx are permanent for that request.
    """
    return isinstance(exc, TransportError | RateLimitedError | ServerSideError)


def is_auth_error(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the credentials were refused (401/403)."""
    return isinstance(exc, AuthRejectedError)
