"""`python -m xpmodel`: the `xpmodel` command, for when the script is not on PATH."""
import sys

from .cli.main import main

if __name__ == "__main__":   # importing the module (pkgutil walks, spawned workers) runs nothing
    sys.exit(main())
