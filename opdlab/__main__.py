import sys

from opdlab.app.cli import main

sys.exit(main())
