"""Run by tests/test_distributed.py under PyTorch's launcher (`python -m torch.distributed.run`): a short data-parallel
fit; process 0 saves the weights and the last metric row. Also builds the one-process reference the test compares with."""
import sys, torch
from pathlib import Path
from torch import nn
from afd_fastai.all import *
from fastai.torch_core import rank_distrib, num_distrib, set_seed

def tiny_net():
    "A small conv net without BatchNorm, so that splitting a batch over processes changes no arithmetic"
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

def without_batchnorm(module):
    "`module` with every BatchNorm (the discriminators') replaced by an identity"
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm): setattr(module, name, nn.Identity())
        else: without_batchnorm(child)
    return module

def build(method, n_nets, bs, paper=False):
    "The same learner in every process: the same seed, data and initial weights"
    set_seed(0, reproducible=True)
    dls = digits_dls(size=8, n_per_class=16, bs=bs)
    learn = afd_learner(dls, [tiny_net() for _ in range(n_nets)], method=method, paper=paper, **distill_methods[method].applicable(adv_lr=1e-3))
    without_batchnorm(learn.model)
    return learn

def train(learn, epochs=2, cbs=None): learn.fit(epochs, lr=0.1, cbs=cbs)

if __name__ == '__main__':
    method, n_nets, paper, bs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'paper', int(sys.argv[4]), sys.argv[5]
    learn = build(method, n_nets, bs, paper)
    learn.path = Path(out).parent
    with learn.distrib_ctx(): train(learn, cbs=CheckpointCallback('run'))
    if rank_distrib() == 0:
        torch.save(dict(world=num_distrib(), state=learn.model.state_dict(), values=list(learn.recorder.values[-1]),
                        names=list(learn.recorder.metric_names)), out)
    torch.distributed.barrier() # process 0 has written its files: every process leaves the group together
    torch.distributed.destroy_process_group()
