"""fieldcrypt's benchmark: `python -m bench [--quick]`. See bench/README.md."""
