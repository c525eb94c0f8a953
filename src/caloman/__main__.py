import sys

from caloman.cli import main

sys.exit(main())
