import sys

from chunkd.cli import main

sys.exit(main())
