import sys

from mnist_sweep.cli import main

sys.exit(main())
