import sys

from oncolite.cli import main

sys.exit(main())
