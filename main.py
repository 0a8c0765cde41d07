"""octa3d command line: ``python main.py --mode MODE [flags]`` (see ``--help``)."""

import sys

from octa3d.cli import main

if __name__ == "__main__":
    sys.exit(main())
