"""`python -m medssm` (also under torchrun)."""

from .cli import main

raise SystemExit(main())
