"""`python -m hybrid_optimization.export RUN_ID --format gguf|hf|packed`: export a finished run's student
(the logic lives in hybrid_optimization/distill/run_export.py)."""
import sys

from hybrid_optimization.distill.run_export import main

if __name__ == "__main__":
    sys.exit(main())
