"""Seconds per training step of several methods for the same networks, measured side by side in one run.

    python benchmarks/step_time.py --models resnet32,wrn16_4 --bs 64 --rounds 3 --steps 5
    python benchmarks/step_time.py --models resnet32,resnet32 --methods vanilla,dml,dml_alternating,kd,one,l1,l1_kd,kd_offline,afd

Methods are interleaved round by round (vanilla, dml, afd, vanilla, ...) so that drifts in machine load hit all of
them alike; each round's first step is a warm-up and is not counted. Data are random 3×32×32 images with 100
classes (the timing does not depend on the pixels). A step is one training batch from `before_batch` to
`after_batch`: forward, losses, backward, the SGD step and, for AFD, the discriminators and the second optimiser.
Offline methods take the first network as their (untrained, frozen) teacher and the others as students.
"""
import time, statistics
import torch
from fastcore.script import call_parse
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.callback.core import Callback
from fastai.torch_core import set_seed, default_device
from afd_fastai.learner import afd_learner, distill_methods, resolve_model

class StepTimer(Callback):
    "Wall time of every training batch"
    order, run_valid = 99, False
    def before_fit(self): self.times = []
    def before_batch(self):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        self.start = time.perf_counter()
    def after_batch(self):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)

def random_dls(n_batches, bs, size=32, c=100):
    xs, ys = torch.randn(n_batches * bs, 3, size, size), torch.randint(0, c, (n_batches * bs,))
    train = DataLoader(list(zip(xs, ys)), bs=bs, shuffle=True, drop_last=True, device=default_device())
    valid = DataLoader(list(zip(xs[:bs], ys[:bs])), bs=bs, device=default_device())
    dls = DataLoaders(train, valid)
    dls.c = c
    return dls

@call_parse
def main(models:str='resnet32,wrn16_4', # comma-separated zoo networks
         methods:str='vanilla,dml,afd', # methods timed side by side
         bs:int=64, # batch size
         rounds:int=3, # rounds over the methods
         steps:int=5, # timed steps per method and round (after one warm-up step)
         threads:int=None): # torch threads (default: torch's choice)
    "Print seconds per training step for each method and the ratio to the first"
    if threads: torch.set_num_threads(threads)
    set_seed(0)
    dls = random_dls(steps + 1, bs)
    methods, nets = methods.split(','), models.split(',')
    def learner(m):
        if distill_methods[m].offline: return afd_learner(dls, nets[1:], method=m, teacher=resolve_model(nets[0], dls.c))
        return afd_learner(dls, nets, method=m)
    learners = {m: learner(m) for m in methods}
    times = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods:
            timer = StepTimer()
            with learners[m].no_bar(), learners[m].no_logging(): learners[m].fit(1, 0.05, cbs=timer)
            times[m] += timer.times[1:]
            print(f"round {r + 1}, {m}: {statistics.median(timer.times[1:]):.3f} s/step", flush=True)
    base = statistics.median(times[methods[0]])
    print(f"\n{' + '.join(nets)}, batch {bs}, {torch.get_num_threads()} threads, device {default_device()}; "
          f"median over {rounds * steps} steps\n\n| method | s/step | ratio to {methods[0]} |\n|---|---|---|")
    for m in methods:
        med = statistics.median(times[m])
        print(f"| {m} | {med:.3f} | {med / base:.2f} |")
