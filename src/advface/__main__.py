"""``python -m advface``: the command line (used where the console script is not installed)."""

from advface.cli import main

if __name__ == "__main__":
    main()
