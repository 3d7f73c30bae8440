__version__ = "0.0.1"

from .compat import install_old_names as _install_old_names
_install_old_names() # `import afd_fastai.fair` and pickles naming the flat layout's modules find them at their new places
