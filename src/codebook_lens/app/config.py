"""The server's settings (``codebook-lens serve`` flags) and the one error type it shows users."""

from __future__ import annotations

from dataclasses import dataclass

from codebook_lens.config import check_range
from codebook_lens.threads import available_cores

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class AppConfig:
    """Settings of ``codebook-lens serve`` (the CLI flags)."""

    cache_dir: str
    """Code cache folder written by ``codebook-lens cache``."""

    model_dir: str | None = None
    """Saved codebook model folder (enables pasted text and steering); it must be the model
    that built the cache."""

    host: str = "127.0.0.1"
    """Interface to bind. Anything but loopback exposes the app to the network."""

    port: int = 8000
    """TCP port (0 picks a free one)."""

    regex_timeout: float = 2.0
    """Seconds a user regex may run before the search is stopped."""

    search_workers: int | None = None
    """Processes that run searches (unset = one per usable core; 0 = in the server process).

    Regex matching holds Python's GIL, so searches in threads share one core; worker
    processes let concurrent searches use every core while the pages stay responsive."""

    page_size: int = 25
    """Default rows per page (search results, documents)."""

    max_page_size: int = 200
    """Largest rows-per-page a request may ask for."""

    max_query_chars: int = 500
    """Longest regex / token / topic query accepted."""

    max_text_chars: int = 20_000
    """Longest pasted text accepted (its tokens are also cut to the model's context and to
    what one page may list codes for)."""

    max_prompt_chars: int = 2_000
    """Longest steering prompt accepted."""

    max_new_tokens: int = 200
    """Most tokens one steering request may generate per sample."""

    max_samples: int = 8
    """Most samples one steering request may ask for."""

    def __post_init__(self) -> None:
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"cache_dir={self.cache_dir!r} is invalid; give a cache folder")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port={self.port!r} is invalid; it must be an integer")
        check_range("port", self.port, 0, 65535)
        check_range("regex_timeout", self.regex_timeout, 0.0, 60.0, low_open=True)
        w = self.search_workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= 256):
            raise ValueError(
                f"search_workers={w!r} is invalid; it must be an integer in 0 .. 256 "
                "(0 = search in the server process) or None (one per core)"
            )
        for name in (
            "page_size",
            "max_page_size",
            "max_query_chars",
            "max_text_chars",
            "max_prompt_chars",
            "max_new_tokens",
            "max_samples",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be an integer >= 1")
        if self.page_size > self.max_page_size:
            raise ValueError(
                f"page_size={self.page_size} is invalid; it must be <= "
                f"max_page_size={self.max_page_size}"
            )

    @property
    def workers(self) -> int:
        """Search processes to start (``search_workers`` with ``None`` resolved)."""
        return available_cores() if self.search_workers is None else self.search_workers

    @property
    def loopback(self) -> bool:
        """Whether the server binds a loopback interface (then only loopback names are served)."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


class AppError(Exception):
    """An error shown to the user as it is: an HTTP status and one clear message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message
