"""Data-parallel training on two processes (PyTorch's launcher, gloo backend, CPU) against one process on the combined
batch: the same parameters, the same metrics; only process 0 writes checkpoints."""
import socket, subprocess, sys
from pathlib import Path
import pytest, torch
from fastcore.test import test_fail as fails
sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import build, train
from afd_fastai.all import *

WORKER = Path(__file__).parent/'distributed_worker.py'

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def launch(tmp_path, *args, n=2):
    "Run the worker on `n` processes with torch.distributed.run; what process 0 saved"
    out = tmp_path/'rank0.pt'
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc-per-node={n}', f'--master-port={free_port()}',
           str(WORKER), *map(str, args), str(out)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return torch.load(out, weights_only=False)

@pytest.mark.parametrize('method,n_nets,mode', [('dml', 2, 'library'), ('afd', 2, 'library'), ('afd', 3, 'paper')])
def test_two_processes_train_as_one_on_the_combined_batch(tmp_path, method, n_nets, mode):
    "bs 8 on each of 2 processes, shuffled, 2 epochs = bs 16 on one: every parameter, loss and metric"
    saved = launch(tmp_path, method, n_nets, mode, 8)
    assert saved['world'] == 2
    one = build(method, n_nets, 16, mode == 'paper')
    initial = {k: v.clone() for k, v in one.model.state_dict().items()}
    with one.no_bar(), one.no_logging(): train(one)
    diff = max((one.model.state_dict()[k] - v).abs().max().item() for k, v in saved['state'].items())
    moved = min(max((one.model.state_dict()[k] - initial[k]).abs().max().item() for k in initial if k.startswith(p))
                for p in ['models.', 'adversaries.'] if any(k.startswith(p) for k in initial))
    print(f'{method} × {n_nets} ({mode}): max parameter difference {diff:.2e}, smallest movement {moved:.2e}')
    assert diff < 1e-5 and moved > 1e-3, (diff, moved)
    assert list(one.recorder.metric_names) == saved['names']
    torch.testing.assert_close(torch.tensor([float(v) for v in one.recorder.values[-1]]),
                               torch.tensor([float(v) for v in saved['values']]), rtol=1e-4, atol=1e-5)
    # process 0 alone wrote the checkpoint, whole, and it holds the trained weights
    assert sorted(p.name for p in (tmp_path/'models').iterdir()) == ['run.pth']
    learn = build(method, n_nets, 16, mode == 'paper')
    learn.path = tmp_path
    learn.load('run')
    for k, v in saved['state'].items(): assert torch.equal(learn.model.state_dict()[k], v), k

def test_sync_batchnorm_is_refused_on_the_cpu():
    learn = build('dml', 2, 8)
    trainer = PeerDistributedTrainer.__new__(PeerDistributedTrainer) # its checks, without starting processes
    trainer.sync_bn, trainer.learn = True, learn
    fails(trainer.before_fit, contains='GPUs only')

def test_afd_train_runs_data_parallel_and_process_0_writes(tmp_path):
    "afd_train under PyTorch's launcher with two processes: one results table, one checkpoint per run, the same rows as its own CSV"
    import shutil, pandas as pd
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node=2', f'--master-port={free_port()}', shutil.which('afd_train'),
           '--method', 'dml', '--seed', '0', '--epochs', '2', '--n-per-class', '10', '--size', '8', '--bs', '8', '--out', 'res']
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = pd.read_csv(tmp_path/'res'/'results.csv')
    assert list(runs['method']) == ['dml'] and runs['acc_avg'].notna().all()
    assert sorted(p.name for p in (tmp_path/'res'/'models').iterdir()) == ['dml_seed0.pth']
