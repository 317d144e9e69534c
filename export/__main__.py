"""`python -m export [flags]`: see export/pipeline.py."""

import sys

from export.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
