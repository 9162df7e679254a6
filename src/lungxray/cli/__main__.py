"""`python -m lungxray.cli`: the command line, as the installed `lungxray` runs it."""

import sys

from lungxray.cli.main import main

sys.exit(main())
