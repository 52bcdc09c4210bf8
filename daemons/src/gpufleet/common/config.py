"""Reading settings from the environment, in one place, with errors that say what to set.

Every daemon builds a frozen settings object from ``os.environ`` at start through these
helpers. A missing or malformed value raises :class:`ConfigError` whose message names the
variable and gives an example; :func:`exit_on_config_error` turns it into exit code 2.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Mapping
from urllib.parse import urlparse

from gpufleet.common.ids import sha256_hex

EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says what to set."""


class Env:
    """Typed access to a mapping of environment variables (``os.environ`` by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        self._environ = os.environ if environ is None else environ

    def raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def str(self, name: str, default: str | None = None, *, required: bool = False,
            example: str = "") -> str | None:
        value = self.raw(name)
        if value is None:
            if required:
                hint = f", e.g. {name}={example}" if example else ""
                raise ConfigError(f"{name} is not set: set it{hint}")
            return default
        return value

    def int(self, name: str, default: int | None = None, *, minimum: int | None = None,
            maximum: int | None = None, required: bool = False) -> int | None:
        value = self.raw(name)
        if value is None:
            if required:
                raise ConfigError(f"{name} is not set: set it to a whole number")
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a whole number: set it to e.g. {default or 1}") from None
        _check_range(name, number, minimum, maximum)
        return number

    def float(self, name: str, default: float | None = None, *, minimum: float | None = None,
              maximum: float | None = None, required: bool = False) -> float | None:
        value = self.raw(name)
        if value is None:
            if required:
                raise ConfigError(f"{name} is not set: set it to a number")
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a number: set it to e.g. {default or 1.0}") from None
        if not math.isfinite(number):
            # nan compares false with every bound, so it would pass the range checks and
            # silently disable whatever the setting drives
            raise ConfigError(f"{name}={value!r} is not a finite number: set it to e.g. {default or 1.0}")
        _check_range(name, number, minimum, maximum)
        return number

    def bool(self, name: str, default: bool = False) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean: set it to true or false")

    def url(self, name: str, default: str | None = None, *, required: bool = False,
            example: str = "http://host:port", schemes: tuple[str, ...] = ("http", "https")) -> str | None:
        value = self.str(name, default, required=required, example=example)
        if value is None:
            return None
        check_url(name, value, example=example, schemes=schemes)
        return value.rstrip("/")

    def bind(self, name: str, default: str) -> tuple[str, int]:
        value = self.str(name, default)
        return parse_bind(name, value)


def _check_range(name: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name}={number} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name}={number} is above the maximum {maximum}")


def check_url(name: str, value: str, *, example: str = "http://host:port",
              schemes: tuple[str, ...] = ("http", "https")) -> None:
    parsed = urlparse(value)
    if parsed.scheme not in schemes or not parsed.netloc:
        raise ConfigError(
            f"{name}={redact_url(value)!r} is not a valid URL: point it at e.g. {example}")


def parse_bind(name: str, value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8000`` for IPv6, ``:8000`` for all interfaces)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={value!r} is not host:port: set it to e.g. 0.0.0.0:8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def secret_hash(name: str, value: str) -> str:
    """The SHA-256 hex of a bearer-token setting given in clear or as ``sha256:<hex>``
    (so an env file need not hold the token itself)."""
    if value.startswith("sha256:"):
        digest = value[len("sha256:"):].strip().lower()
        if len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
            raise ConfigError(f"{name}=sha256:… must be followed by 64 hex digits "
                              "(the SHA-256 of the token, e.g. from `printf %s TOKEN | sha256sum`)")
        return digest
    if len(value) < 16:
        raise ConfigError(f"{name} is too short: use at least 16 characters, "
                          "e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return sha256_hex(value)


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return parsed._replace(netloc=netloc).geturl()
    return url


def exit_on_config_error(main: Callable[..., object]) -> Callable[..., object]:
    """Decorate a console-script entry point: a ConfigError prints its message and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ConfigError as exc:
            prog = os.path.basename(sys.argv[0]) if sys.argv else "gpufleet"
            print(f"{prog}: configuration error: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_CONFIG) from None

    return wrapper
