"""`python -m hybrid_optimization.distill ...` — the same CLI as distillation.py."""
import sys

from .cli import main

sys.exit(main())
