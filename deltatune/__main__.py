"""`python -m deltatune ...` (what torchrun runs): the `deltatune` command."""
import sys

from deltatune.cli import main

sys.exit(main())
