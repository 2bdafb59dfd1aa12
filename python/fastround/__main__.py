import sys

from fastround.cli import main

sys.exit(main())
