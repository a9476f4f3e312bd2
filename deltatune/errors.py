"""User-facing errors: every mistake a user can make raises one `DeltatuneError` subclass whose
message says what went wrong and how to fix it. The CLI prints it on one line and exits 2."""
from __future__ import annotations


class DeltatuneError(Exception):
    """Base class of every error caused by user input (config, data, paths, models)."""


class ConfigError(DeltatuneError):
    """A configuration value is invalid or inconsistent."""


class TargetNotFoundError(ConfigError):
    """A method's target module pattern matched nothing (the message lists valid names)."""


class DataError(DeltatuneError):
    """A data file is missing, malformed (message names file and line), empty or lacks a column."""


class ModelNotFoundError(DeltatuneError):
    """A model name is neither a known model, a local folder, nor reachable on the hub."""


class AdapterFormatError(DeltatuneError):
    """An adapter folder is missing files, has unknown keys, or does not fit the model."""


class MergeNotSupportedError(DeltatuneError):
    """The method changes the computation in a way that cannot be folded into the weights."""


class TrainingError(DeltatuneError):
    """Training diverged (NaN/inf loss) or cannot proceed with the given settings."""


class AdapterStateError(DeltatuneError):
    """An adapter operation that the handle's state (merged, disabled, scaled) forbids, or that
    the method cannot do at all (switching off or scaling a method that keeps no delta); the
    message says what to do instead."""


class CustomCodeError(DeltatuneError):
    """A model, tokenizer or adapter folder ships Python code (an `auto_map` entry) that loading
    would run, and the user did not opt in with trust_remote_code / --trust-remote-code."""
