"""`python3 -m mobile ...` is `python3 -m mobile.classify ...`."""

import sys

from mobile.classify import main

sys.exit(main())
