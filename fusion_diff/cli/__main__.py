import sys

from fusion_diff.cli import main

sys.exit(main())
