"afd_bench: the plain loop it compares with does the library's math; the command writes its tables; bad options fail clearly"
import copy
import pandas as pd
import pytest
import torch
from fastai.torch_core import set_seed
from afd_fastai.tools.bench import random_dls, bench_learner, PlainLoop, peak_memory, main
from afd_fastai.models import resnet20, wrn16_2
from fastai.callback.core import Callback
import fastai.callback.channelslast # Learner.to_channelslast

class KeepBatches(Callback):
    def before_fit(self): self.batches = []
    def before_batch(self):
        if self.training: self.batches.append((self.x.clone(), self.y.clone()))

class InFloat64(Callback):
    order = -10 # before KeepBatches
    def before_batch(self): self.learn.xb = tuple(x.double() for x in self.xb)
    def after_step(self): self.learn.loss = self.loss.float() # fastai's smoothed loss is a float32 tensor

def library_vs_plain(models, method, float64:bool=True, **kwargs):
    """Largest parameter difference after 3 steps of the Learner and of `PlainLoop` from the same weights, and how far they moved.
    In float64 by default: in float32 the sums inside a convolution are ordered by the number of threads, and Adam (AFD's second
    optimiser) turns a last-bit difference of a near-zero gradient into a step of up to its lr (1e-4 differences were seen
    between 1 and 2 threads); in float64 such differences stay near 1e-15, so the 1e-5 bound below holds whatever the threads."""
    set_seed(0)
    learn = bench_learner(random_dls(3, bs=8, size=16, c=10), models, method, **kwargs.pop('learner', {}))
    if float64: learn.model.double()
    channels_last = kwargs.get('channels_last', False)
    if channels_last: learn.to_channelslast(use_amp=False)
    loop, start, kept = PlainLoop(learn, lr=0.05, **kwargs), copy.deepcopy(learn.model), KeepBatches()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.05, cbs=[InFloat64()] * float64 + [kept])
    for x, y in kept.batches: loop.step(x, y)
    adv = lambda advs: list(advs.parameters()) if method == 'afd' else []
    lib = [p for net in learn.model.models for p in net.parameters()] + adv(learn.model.adversaries if method == 'afd' else None)
    plain = [p for net in loop.nets for p in net.parameters()] + adv(loop.advs if method == 'afd' else None)
    first = [p for net in start.models for p in net.parameters()] + adv(start.adversaries if method == 'afd' else None)
    assert len(lib) == len(plain)
    return (max((a - b).abs().max().item() for a, b in zip(lib, plain)),
            max((a - b).abs().max().item() for a, b in zip(lib, first)))

@pytest.mark.parametrize('method', ['dml', 'afd'])
def test_plain_loop_matches_three_cyclic_networks(method):
    "Three networks (AFD: the cyclic topology), each student's terms from its one teacher"
    diff, moved = library_vs_plain([resnet20, wrn16_2, resnet20], method)
    assert moved > 1e-2 and diff < 1e-5, (diff, moved)

def test_plain_loop_follows_the_learners_topology():
    "DML on three networks in a cycle: each learns from one peer only, in the library and in the plain loop"
    diff, moved = library_vs_plain([resnet20, wrn16_2, resnet20], 'dml', learner=dict(topology='cyclic'))
    assert moved > 1e-2 and diff < 1e-5, (diff, moved)

def test_plain_loop_matches_with_channels_last():
    "fastai's to_channelslast beside AFD: the same steps as the plain loop in channels-last format"
    diff, moved = library_vs_plain([resnet20, wrn16_2], 'afd', channels_last=True)
    # channels-last kernels sum in another order than the plain loop's copy: in float32 AFD's Adam turns those last-bit
    # gradient differences into steps up to its lr (1e-4 was seen); in float64 they stay near 1e-15
    assert moved > 1e-2 and diff < 1e-5, (diff, moved)

def test_plain_loop_refuses_a_method_it_does_not_write_out():
    learn = bench_learner(random_dls(2, bs=4, size=16, c=10), [resnet20, resnet20], 'kd')
    with pytest.raises(ValueError, match='PlainLoop writes out vanilla, dml, afd, not kd'): PlainLoop(learn)

def test_afd_bench_writes_its_tables(tmp_path, capsys):
    "The console entry point on a tiny configuration: CSV and Markdown, one row per method and implementation, memory measured"
    main(['--models', 'resnet20,resnet20', '--methods', 'vanilla,afd,kd', '--bs', '8', '--size', '16', '--rounds', '2',
                 '--steps', '2', '--warmup', '1', '--out', str(tmp_path/'bench')])
    df = pd.read_csv(tmp_path/'bench'/'bench.csv')
    assert list(zip(df.method, df.impl)) == [('vanilla', 'library'), ('vanilla', 'plain'), ('afd', 'library'), ('afd', 'plain'),
                                             ('kd', 'library')]
    assert (df.s_per_step > 0).all() and (df.peak_mib > 0).all() and df.peak_mib.nunique() > 1
    md = (tmp_path/'bench'/'bench.md').read_text()
    assert 'library ÷ plain' in md and '÷ vanilla (library)' in md and 'resnet20 + resnet20, batch 8' in md
    assert md in capsys.readouterr().out

def test_peak_memory_side_by_side_is_each_alone():
    "The memory processes run together, each measuring its own peak: the figures are those of each run alone, in order"
    base = dict(models=['resnet20', 'resnet20'], bs=8, size=16, device='cpu', precision='fp32', channels_last=False,
                paper=False, lr=0.05, warmup=1, steps=2, compile=False)
    configs = [dict(method='vanilla', impl='library', **base), dict(method='afd', impl='plain', **base)]
    alone, together = [peak_memory([c])[0] for c in configs], peak_memory(configs)
    assert alone[1] > alone[0] * 1.1 # afd's discriminators and plain loop: more than vanilla, distinguishable
    assert all(abs(t - a) < 0.08 * a for a, t in zip(alone, together)), (alone, together)
    with pytest.raises(RuntimeError, match=r'Measuring the memory of nope \(library\) failed'): # one process failing: named
        peak_memory([configs[0], dict(configs[0], method='nope')])

@pytest.mark.parametrize('args,message', [
    (['--precision', 'fp16', '--device', 'cpu'], 'needs a CUDA device'),
    (['--precision', 'fp8'], 'precision must be one of fp32, fp16, bf16'),
    (['--methods', 'afd,nope'], 'unknown method(s) nope'),
    (['--steps', '0'], 'at least 1'),
])
def test_afd_bench_bad_options(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit: main(args + ['--out', str(tmp_path/'bench')])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path/'bench').exists()

def test_afd_bench_times_a_full_epoch(tmp_path):
    "--epoch: one epoch of CIFAR-100-shaped data (here 64 + 32 images) per method, and what 300 would take"
    main(['--epoch', '--models', 'resnet20,resnet20', '--methods', 'vanilla,afd', '--n-train', '64', '--n-valid', '32',
          '--bs', '16', '--out', str(tmp_path)])
    df = pd.read_csv(tmp_path/'epoch.csv')
    assert list(df.method) == ['vanilla', 'afd'] and (df.seconds_per_epoch > 0).all()
    assert abs(df.hours_for_epochs[1] - df.seconds_per_epoch[1] * 300 / 3600) < 1e-9
    md = (tmp_path/'epoch.md').read_text()
    assert 'one epoch of 64 random 32×32 images (100 classes) and validation of 32' in md and '300 epochs (hours)' in md

def test_console_script_exits_0(tmp_path):
    "The installed command (a console script's return value would be its exit status)"
    import subprocess
    res = subprocess.run(['afd_bench', '--models', 'resnet20,resnet20', '--methods', 'vanilla', '--bs', '4', '--size', '8',
                          '--rounds', '1', '--steps', '1', '--warmup', '1', '--no-memory', '--no-plain', '--out', str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path/'bench.md').read_text() in res.stdout
