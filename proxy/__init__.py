"""fieldcrypt: a Redis proxy that keeps configured hash fields encrypted at rest."""

__version__ = "0.1.0"
