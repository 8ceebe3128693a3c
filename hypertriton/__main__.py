"""``python -m hypertriton``: the command line."""

from hypertriton.cli import main

if __name__ == "__main__":  # importing this module (pydoc, autodoc, a walk over all modules) runs nothing
    raise SystemExit(main())
