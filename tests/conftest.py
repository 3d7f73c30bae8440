import matplotlib
matplotlib.use('Agg')
import warnings
import pytest
from fastai.torch_core import set_seed
from afd_fastai.data import digits_dls

warnings.filterwarnings('ignore', category=FutureWarning)

@pytest.fixture(scope='session')
def small_digits():
    "Digits at 16×16 with 50 training images per class: quick to train on, still real images"
    return digits_dls(size=16, n_per_class=50, bs=32, seed=0)

@pytest.fixture(autouse=True)
def seeded():
    set_seed(0, reproducible=True)
