import sys

from opdlab.cli import main

sys.exit(main())
