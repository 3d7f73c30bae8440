"The real Fashion-MNIST (Debian's dataset-fashion-mnist, which .ci/run installs): read whole, drawn per class, learnt"
import numpy as np, pytest, torch
from afd_fastai.data import load_fashion_mnist, fashion_mnist_dls, find_fashion_mnist, fashion_mnist_classes
from afd_fastai.learner import afd_learner

def test_reads_the_standard_files():
    x_train, y_train, x_test, y_test, classes = load_fashion_mnist()
    assert x_train.shape == (60_000, 1, 28, 28) and x_test.shape == (10_000, 1, 28, 28) and x_train.dtype == torch.uint8
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    assert y_train[:3].tolist() == [9, 0, 0] and classes == fashion_mnist_classes # the files' first labels: ankle boot, T-shirts
    assert [f.name for f in find_fashion_mnist()][0].startswith('train-images-idx3-ubyte')

def test_class_balanced_draws_and_the_whole_test_set():
    dls = fashion_mnist_dls(n_per_class=30, seed=3, bs=50)
    y = dls.train.dataset.batch_tensors[1].cpu()
    assert np.bincount(y.numpy()).tolist() == [30] * 10 and len(dls.valid_ds) == 10_000
    again = fashion_mnist_dls(n_per_class=30, seed=3, bs=50)
    assert torch.equal(dls.train.dataset.batch_tensors[0], again.train.dataset.batch_tensors[0]) # the same draw per seed
    other = fashion_mnist_dls(n_per_class=30, seed=4, bs=50)
    assert not torch.equal(dls.train.dataset.batch_tensors[0], other.train.dataset.batch_tensors[0])
    with pytest.raises(ValueError, match="n_per_class=6001 but class 0 \\('T-shirt/top'\\) has only 6000"):
        fashion_mnist_dls(n_per_class=6001)

def test_peers_learn_real_clothes():
    "Two ResNet-20s, 40 images per class, 4 epochs: far above chance (10 %) on 300 held-out training images"
    dls = fashion_mnist_dls(n_per_class=40, holdout_per_class=30, bs=40)
    learn = afd_learner(dls, ['resnet20', 'resnet20'], method='dml')
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 0.05)
    acc = dict(zip([m.name for m in learn.metrics], learn.recorder.values[-1][2:]))
    assert acc['acc_ens'] > 0.5, acc

def test_benchmark_appends_one_row_per_run_and_skips_finished_ones(tmp_path, capsys):
    import sys, pandas as pd
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parents[1]/'benchmarks'))
    import fashion_mnist
    args = dict(n_per_class=2, holdout=2, bs=10, epochs='1', seeds='0', methods='vanilla,afd', out=str(tmp_path/'fm.csv'))
    fashion_mnist.main(**args)
    runs = pd.read_csv(tmp_path/'fm.csv')
    assert list(runs.method) == ['vanilla', 'afd'] and set(runs.regime) == {'fm2_holdout'} and runs.acc_avg.between(0, 1).all()
    assert runs.d_loss.isna().tolist() == [True, False] # AFD's last losses are kept
    assert (runs.torch == torch.__version__).all() # a seed retraces its run only under the same torch
    fashion_mnist.main(**args) # an interrupted sweep continues: finished runs are not run again
    assert len(pd.read_csv(tmp_path/'fm.csv')) == 2
    assert runs.adv_warned.tolist()[1] in (0, 1) and runs.adv_warned_at.isna().tolist()[0] # when the guard warned (empty: never)
    new_cols = ['adv_warned_at', 'torch'] # columns a file from before them lacks
    old = pd.read_csv(tmp_path/'fm.csv', dtype=str, keep_default_na=False).drop(columns=new_cols)
    old.to_csv(tmp_path/'fm.csv', index=False)
    fashion_mnist.main(**{**args, 'methods': 'vanilla,dml'}) # vanilla again: its row's torch is not recorded, so not this one
    grown = pd.read_csv(tmp_path/'fm.csv')
    assert list(grown.columns) == list(runs.columns) # the file takes the rows' columns, in their order: later rows append
    assert list(grown.method) == ['vanilla', 'afd', 'vanilla', 'dml'] and grown.torch.isna().tolist() == [True, True, False, False]
    kept = pd.read_csv(tmp_path/'fm.csv', dtype=str, keep_default_na=False).iloc[:2]
    pd.testing.assert_frame_equal(kept[old.columns], old) # the old rows kept as written (an integer column stays integer)
    assert (kept[new_cols] == '').all().all()
    fashion_mnist.main(summary=str(tmp_path/'fm.csv'))
    printed = capsys.readouterr().out # each torch's runs paired among themselves (a seed retraces its run only under one torch)
    assert '| fm2_holdout | resnet20,wrn16_2 | 1 | not recorded | afd |' in printed and f'| {torch.__version__} | dml |' in printed
    grown.loc[3, 'torch'] = '0.0-another' # dml made under another torch: run again under this one
    grown.to_csv(tmp_path/'fm.csv', index=False)
    fashion_mnist.main(**{**args, 'methods': 'vanilla,dml'})
    assert list(pd.read_csv(tmp_path/'fm.csv').method) == ['vanilla', 'afd', 'vanilla', 'dml', 'dml']
    assert not (tmp_path/'fm_checkpoints').exists() # each run's checkpoint goes once its row is written

def test_benchmark_resumes_an_interrupted_run_as_if_uninterrupted(tmp_path):
    "Cut in its second epoch, a benchmark run started again continues from its checkpoint and ends with the same results"
    import sys
    from pathlib import Path
    from fastai.callback.core import Callback
    sys.path.insert(0, str(Path(__file__).parents[1]/'benchmarks'))
    import fashion_mnist
    class PowerCut(Callback):
        def after_batch(self):
            if self.epoch == 1 and self.iter == 1: raise RuntimeError('power cut')
    run = lambda ckpt, cbs=(): fashion_mnist.one_run(2, ['resnet20', 'resnet20'], 'afd', 3, 0, bs=10, holdout=2, checkpoint=ckpt, cbs=cbs)
    whole = run(tmp_path/'whole'/'run.pth')
    with pytest.raises(RuntimeError, match='power cut'): run(tmp_path/'cut'/'run.pth', [PowerCut()])
    assert (tmp_path/'cut'/'run.pth').exists()
    class Steps(Callback):
        n = 0
        def after_batch(self): self.n += self.training
    steps = Steps()
    resumed = run(tmp_path/'cut'/'run.pth', [steps])
    assert steps.n == 2 * 2, steps.n # epochs 1 and 2 (2 batches each); epoch 0 came from the checkpoint
    assert resumed[:2] == whole[:2], (resumed, whole) # every accuracy and AFD's last losses
    restarted = run(None) # without the checkpoint: the same run from the start
    assert restarted[:2] == whole[:2]
