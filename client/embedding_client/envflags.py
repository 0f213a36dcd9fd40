"""Flags from the environment, read one way by every command.

``embedding-server`` (``EMBEDDING_<FLAG>``), ``embedding-rest`` (``EMBEDDING_REST_<FLAG>``),
``embedding-healthcheck`` (``EMBEDDING_HEALTHCHECK_<FLAG>``) and ``embedding-client``
take each flag's default from its variable; the command line still wins. A value that does not
parse is one line naming the variable (``EMBEDDING_PORT='xyz': invalid port value``), in the words
argparse uses for the same flag on the command line. It lives in the client package because the
server depends on the client, not the other way round.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


class OneLineParser(argparse.ArgumentParser):
    """A bad flag value is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def variable_name(prefix: str, flag: str) -> str:
    """``--tls-ca`` (or ``tls_ca``) with prefix ``EMBEDDING_`` → ``EMBEDDING_TLS_CA``."""
    return prefix + flag.lstrip("-").upper().replace("-", "_")


def parse_boolean(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off/empty, any case; anything else is a ValueError."""
    word = text.strip().lower()
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"expected one of {', '.join(TRUE_WORDS + FALSE_WORDS[:-1])}")
    return word in TRUE_WORDS


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (a flag type: argparse says "invalid port value: 'http'")."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text}")
    return value


port_number.__name__ = "port"


def parse_value(name: str, raw: str, convert: Callable[[str], T]) -> T:
    """``convert(raw)``; a failure is a ValueError whose message names the variable ``name``."""
    try:
        return convert(raw)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{name}={raw!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        kind = getattr(convert, "__name__", "")
        reason = str(exc) if convert is parse_boolean or not kind else f"invalid {kind} value"
        raise ValueError(f"{name}={raw!r}: {reason}") from None


def _convert(action: argparse.Action) -> Callable[[str], Any]:
    if isinstance(action, argparse._AppendAction):
        return lambda raw: [part.strip() for part in raw.split(",") if part.strip()]
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        return parse_boolean
    convert = action.type
    return convert if callable(convert) else str


def apply_environment(
    parser: argparse.ArgumentParser,
    environ: Mapping[str, str],
    prefix: str,
    only: Iterable[str] | None = None,
) -> None:
    """Use ``<prefix><FLAG>`` as each flag's default (``only``: just these flags, by dest).

    A repeatable flag takes a comma-separated list; a switch takes :func:`parse_boolean`'s words.
    A bad value ends the command through ``parser.error`` with the variable's name.
    """
    wanted = None if only is None else set(only)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if wanted is not None and action.dest not in wanted:
            continue
        name = variable_name(prefix, action.option_strings[0])
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            value = parse_value(name, raw, _convert(action))
            if action.choices is not None and value not in action.choices:
                raise ValueError(f"{name}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        except ValueError as exc:
            parser.error(str(exc))
        parser.set_defaults(**{action.dest: value})
