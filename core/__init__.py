"""The domain core: what every layer above shares, with no I/O of its own.

``errors`` (the exception tree), ``contracts`` (Envelope, Failure and the
Source / Sink / Stage protocols), ``version``, the bounded cache the hot path
keys by message text, and the located-YAML reader that makes config errors
name file, line and field. Nothing here imports another ehrbridge layer or a
third-party I/O library (``.importlinter`` checks both).
"""
