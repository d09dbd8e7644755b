import sys

from fxprune.cli.main import main

sys.exit(main())
