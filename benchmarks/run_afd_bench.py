"`afd_bench` with this command line, where the console script is not installed (a lent GPU machine: the library on PYTHONPATH)"
import sys
import fastcore
from afd_fastai.tools.bench import afd_bench

# fastcore 1.x spells the options as the parameters (--no_memory), 2.x with dashes (--no-memory): take either
dashes = int(fastcore.__version__.split('.')[0]) >= 2
sys.argv[1:] = ['--' + (a[2:].replace('_', '-') if dashes else a[2:].replace('-', '_')) if a.startswith('--') else a for a in sys.argv[1:]]
afd_bench()
