"""Errors that name the problem in the user's terms."""


class SaliencyLabError(Exception):
    """Base class for every error saliencylab raises on purpose."""


class InputError(SaliencyLabError, ValueError):
    """Bad input: wrong shape or dtype, NaN, unreadable file, target out of range."""


class ConfigError(SaliencyLabError, ValueError):
    """Unknown method, metric, layer, model or parameter."""


def unknown_name(kind: str, name, choices) -> ConfigError:
    """"unknown <kind> '<name>'" with the closest registered names, or the full list when none is close."""
    import difflib

    choices = sorted(choices)
    close = difflib.get_close_matches(str(name), choices, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(choices)}"
    return ConfigError(f"unknown {kind} '{name}'{hint}")


def one_line(text) -> str:
    """Any message folded to one line (errors are printed as one `error:` line)."""
    return " ".join(str(text).split()) or "(no message)"


def error_message(exc: BaseException) -> str:
    """Our own errors speak for themselves; anything else is named as unexpected."""
    if isinstance(exc, SaliencyLabError):
        return one_line(exc)
    return one_line(f"unexpected {type(exc).__name__}: {exc}")
