"""`python -m mailfilter` = the `mailfilter` console script."""
import sys

from mailfilter.cli import main

sys.exit(main())
