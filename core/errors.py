"""Domain errors carry their HTTP status; one handler in api/ renders them."""


class DomainError(Exception):
    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    """Conflicts with what is stored; `stored` is that object when there is one to show."""

    status_code = 409

    def __init__(self, message: str, stored: object | None = None) -> None:
        super().__init__(message)
        self.stored = stored


class Invalid(DomainError, ValueError):
    status_code = 422


class TooLarge(DomainError):
    status_code = 413


class Unauthorized(DomainError):
    status_code = 401


class Forbidden(DomainError):
    status_code = 403


class RetryLater(DomainError):
    """Refused for now, not for good: the caller should retry after `retry_after_s` seconds
    (the Retry-After header)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(RetryLater):
    """Too much work in progress, or the database busy or unreachable."""

    status_code = 503


class RateLimited(RetryLater):
    """This caller sent more than its share."""

    status_code = 429


class UpstreamFailed(DomainError):
    """A server draftloop drafts through answered with an error or nonsense (a bad gateway)."""

    status_code = 502
