"""The compression core. Importing it registers ``builtin:NAME`` teachers with ``models.resolve``."""

from . import teacher  # noqa: F401
