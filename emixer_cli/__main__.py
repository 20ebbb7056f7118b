"""`python -m emixer_cli` is the `emixer` command."""

import sys

from emixer_cli.main import main

sys.exit(main())
