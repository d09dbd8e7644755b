import sys

from fxprune.cli.commands import main

sys.exit(main())
