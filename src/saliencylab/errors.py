"""Errors that name the problem in the user's terms."""


class SaliencyLabError(Exception):
    """Base class for every error saliencylab raises on purpose."""


class InputError(SaliencyLabError, ValueError):
    """Bad input: wrong shape or dtype, NaN, unreadable file, target out of range."""


class ConfigError(SaliencyLabError, ValueError):
    """Unknown method, metric, layer, model or parameter."""
