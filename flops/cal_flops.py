"""FLOPs/MACs/params/bytes per block and in total: see `python flops/cal_flops.py --help`."""
import sys

from bitalloc.cost_cli import main

if __name__ == "__main__":
    sys.exit(main())
