"""Chitrakar's shared core: settings, domain rules and user-facing texts.

Both the bot (`bot/`) and the GPU workers (`workers/`) import this package; neither imports
the other. Nothing in `chitrakar.domain` or `chitrakar.texts` does I/O.
"""

__version__ = "0.1.0"
