"""Errors caused by bad input (config, data, files). `latent_lm.main` prints these as one line, without a
traceback, and exits with status 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    pass


class ConfigError(UserError, ValueError):
    """A config value that cannot work (mesh shape vs devices, batch vs data parallelism, sizes, names)."""


class DataError(UserError, ValueError):
    """Data that does not match the config (latent shape in a cache, record count, too few examples)."""


class MissingInputError(UserError, FileNotFoundError):
    """A dataset, cache or checkpoint the requested stage needs is not there."""
