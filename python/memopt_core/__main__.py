"""`python -m memopt_core demo ...`: the `memopt` command without the installed script."""
import sys

from .app.cli import main

sys.exit(main())
