"""The ``kernelprop`` command: ``python cli.py …`` runs it from a checkout; the app is kernelprop.cli."""

from kernelprop.cli import app, main

__all__ = ["app", "main"]

if __name__ == "__main__":
    main()
