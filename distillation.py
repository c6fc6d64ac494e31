#!/usr/bin/env python
"""The guide's distillation CLI (HYBRID_OPTIMIZATION_GUIDE.md, "Integration with Distillation Training").

    python distillation.py --hybrid --ternary --qat --epochs 20 --data_clusters 8 --param_clusters 4 --lr 0.001 \
        --save_metrics --eval_every 2

A thin shim over `hybrid_optimization.distill` (see `python distillation.py --help`).
"""
import gc
import sys

from hybrid_optimization.distill.cli import main

if __name__ == "__main__":
    code = main()
    gc.freeze()         # skip the final garbage collection over torch's objects (8.5 s -> 1.6 s): see distill/__main__.py
    sys.exit(code)
