"`afd_bench` with this command line, where the console script is not installed (a lent GPU machine: the library on PYTHONPATH)"
from afd_fastai.bench import afd_bench
afd_bench()
