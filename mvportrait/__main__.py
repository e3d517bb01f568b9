import sys

from mvportrait.cli import main

sys.exit(main())
