"""`python -m edgeshard.coordinator.cli`: the same as the `edgeshard` command."""

import sys

from edgeshard.coordinator.cli.main import main

sys.exit(main())
