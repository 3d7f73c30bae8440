"""Peers against training alone on real images: Fashion-MNIST, per network, method, training-set size and seed.

Every method of one seed starts from the same initial weights and sees the same batches and the same augmentation
draws, so methods are compared seed by seed (paired differences). Validation is the whole official test set (10,000
images), or, with `--holdout N`, N other *training* images per class: settings (schedule length, method settings) are
chosen on that split, never on the test set. Rows are appended to `--out` as runs finish; a row already there is not
run again, so an interrupted sweep continues where it stopped. A run still going saves a checkpoint after every epoch
(in `--checkpoints`, by default a folder beside `--out`) and the next start resumes it from there, exactly as it would
have gone on (its `seconds` include those before the interruption); the checkpoint is deleted when its row is written.

    python benchmarks/fashion_mnist.py --n_per_class 100 --nets resnet20,wrn16_2 --methods vanilla,dml,kd,afd \\
        --epochs 60 --seeds 0,1,2,3,4
    python benchmarks/fashion_mnist.py --n_per_class 100 --methods afd --paper --tag paper ...   # AFD, the paper's settings
    python benchmarks/fashion_mnist.py --holdout 200 --methods vanilla --epochs 15,30,60 ...    # where vanilla flattens
    python benchmarks/fashion_mnist.py --summary benchmarks/results/fashion_mnist.csv          # the tables

A run's regime is recorded as `fm<N>` (N training images per class; `fm<N>_holdout` when validated on the holdout).
"""
import re, warnings
from pathlib import Path
from fastcore.script import call_parse
from fastai.torch_core import set_seed
import fastai.callback.channelslast # Learner.to_channelslast
import pandas as pd
from afd_fastai.data import fashion_mnist_dls
from afd_fastai.learner import afd_learner, CheckpointCallback
from afd_fastai.tools.experiment import FitClock, ValidateEvery, markdown_table, paired, paired_ci, read_runs, comparison_cols
from afd_fastai.callback.adversarial import AdversarialDivergenceWarning
from short_schedules import parse_settings, result_row, _append, _done

def one_run(n_per_class, nets, method, epochs, seed, bs=64, lr=0.05, holdout=None,
            checkpoint=None, # file: saved after every epoch, and resumed from if it exists (None: no checkpoint)
            cbs=(), **settings):
    "Train `nets` with `method` for `epochs` of `fit_one_cycle`, validating after the last; each network's, the average and the ensemble's accuracy"
    set_seed(seed, reproducible=True)
    dls = fashion_mnist_dls(n_per_class=n_per_class or None, seed=seed, bs=bs, holdout_per_class=holdout)
    learn = afd_learner(dls, list(nets), method=method, **settings).to_channelslast(use_amp=False)
    clock, saved = FitClock(), []
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        learn.path, learn.model_dir = checkpoint.parent, '.'
        saved = [CheckpointCallback(checkpoint.stem, resume=True)]
    set_seed(seed, reproducible=True) # the same augmentation draws for every method
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=[ValidateEvery(epochs), clock, *saved, *cbs])
    values = dict(zip([m.name for m in learn.metrics], learn.recorder.values[-1][2:]))
    accs = {k: float(v) for k, v in values.items() if k.startswith('acc_')}
    adv = getattr(learn, 'adversarial_feature', None)
    game = {} if adv is None else dict(d_loss=values['d_loss'], g_loss=values['g_loss'], adv_warned=int(adv.warned), adv_warned_at=adv.warned_at)
    return accs, game, clock.seconds

@call_parse
def main(n_per_class:int=100, # training images per class (0: all 6,000)
         nets:str='resnet20,wrn16_2', # zoo networks, comma-separated
         methods:str='vanilla,dml,kd,afd', # methods, comma-separated
         epochs:str='60', # lengths of fit_one_cycle, comma-separated
         seeds:str='0,1,2,3,4', # seeds, comma-separated
         bs:int=64, # batch size
         lr:float=0.05, # fit_one_cycle's maximum lr
         holdout:int=None, # validate on this many other training images per class instead of the test set
         tag:str='default', # the name of these settings in the results
         settings:str='', # other afd_learner settings, 'name=value;...'
         paper:bool=False, # the paper-faithful learners (afd_learner(paper=True))
         out:str='benchmarks/results/fashion_mnist.csv', # results, one row per run (appended)
         checkpoints:str=None, # folder for the checkpoint of a run still going (default: `<out>_checkpoints` beside --out)
         summary:str=None): # print the tables of this results file and stop
    "Fashion-MNIST runs, one CSV row each"
    if summary:
        runs = read_runs(summary)
        print(markdown_table(paired(runs, by=comparison_cols)))
        print(markdown_table(paired_ci(runs, by=comparison_cols).round(2)))
        return
    extra = parse_settings(settings)
    if paper: extra['paper'] = True
    done = _done(out)
    regime = f"fm{n_per_class or 'all'}" + ('_holdout' if holdout else '')
    folder = Path(checkpoints) if checkpoints else Path(out).with_name(Path(out).stem + '_checkpoints')
    for n_epochs in map(int, epochs.split(',')):
        for seed in map(int, seeds.split(',')):
            for method in methods.split(','):
                if (regime, nets, method, tag, n_epochs, seed) in done: continue
                with warnings.catch_warnings(): # the guard's warning is recorded in the row (adv_warned)
                    warnings.simplefilter('ignore', AdversarialDivergenceWarning)
                    ckpt = folder/(re.sub(r'[^\w.=+-]', '_', f'{regime}_{nets}_{method}_{tag}_{n_epochs}ep_seed{seed}') + '.pth')
                    if ckpt.exists(): print(f"{regime} {nets} {method}/{tag} {n_epochs} ep seed {seed}: resumed from {ckpt}", flush=True)
                    accs, game, secs = one_run(n_per_class, nets.split(','), method, n_epochs, seed, bs, lr, holdout, ckpt, **extra)
                row = result_row(regime, nets, method, tag, n_epochs, seed, accs, game, secs)
                _append(out, row)
                ckpt.unlink() # the row holds the run now
                if not any(folder.iterdir()): folder.rmdir()
                print(f"{regime} {nets} {method}/{tag} {n_epochs} ep seed {seed}: acc_avg {100 * row['acc_avg']:.2f} "
                      f"ens {100 * row['acc_ens']:.2f} ({secs:.0f} s)", flush=True)
