"""Peers against training alone on short `fit_one_cycle` schedules: accuracy per network, method, length and seed.

Every run of one seed starts from the same initial weights and the same batches, so methods can be compared seed by
seed (paired differences). Rows are appended to `--out` as they finish; a row already there is not run again, so an
interrupted sweep continues where it stopped. AFD rows also hold the last epoch's `d_loss` and `g_loss` and whether
the divergence guard warned (`adv_warned`).

    python benchmarks/short_schedules.py --regime noisy --nets resnet20,resnet20 --methods vanilla,dml,kd,afd \\
        --epochs 2,5,10,30 --seeds 0,1,2,3,4 --out short.csv
    python benchmarks/short_schedules.py --summary short.csv   # the tables: mean ± std and paired differences

Regimes: `all` (every training image, clean labels) and `noisy` (the demo's: 20 images per class, 40 % of the labels
wrong); both 16×16 digits, batch 64 and 32 (`--size`, `--bs` change that; another size is recorded as e.g.
`all_32px`). `--tag NAME --settings "T=1;distill_warmup=0.3"`
passes other `afd_learner` settings, recorded under NAME; `--paper` builds the paper-faithful learners.
"""
import ast, csv, time, warnings
from pathlib import Path
import pandas as pd, torch
from fastcore.script import call_parse
from fastai.torch_core import set_seed
from afd_fastai.data import digits_dls
from afd_fastai.learner import afd_learner
from afd_fastai.callback.adversarial import AdversarialDivergenceWarning
from afd_fastai.tools.experiment import markdown_table, paired, read_runs, comparison_cols, _csv_replace

regimes = dict(all=dict(n_per_class=None, label_noise=0., bs=64), # digits_dls' defaults but 16×16
               noisy=dict(n_per_class=20, label_noise=0.4, bs=32)) # the demo's regime

def parse_settings(text:str):
    "'a=1;b=x;c=(1, 2)' → {'a': 1, 'b': 'x', 'c': (1, 2)}"
    out = {}
    text = text or ''
    for part in filter(None, text.split(';')):
        k, v = part.split('=')
        try: out[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError): out[k.strip()] = v.strip()
    return out

def one_run(regime, nets, method, epochs, seed, size=16, bs=None, lr=0.05, **settings):
    "Train `nets` with `method` for `epochs` of `fit_one_cycle`; each network's and the ensemble's final accuracy"
    set_seed(seed, reproducible=True)
    data = {**regimes[regime], **({} if bs is None else {'bs': bs})}
    dls = digits_dls(size=size, seed=seed, **data)
    learn = afd_learner(dls, list(nets), method=method, **settings)
    start = time.time()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    values = dict(zip([m.name for m in learn.metrics], learn.recorder.values[-1][2:]))
    accs = {k: float(v) for k, v in values.items() if k.startswith('acc_')}
    adv = getattr(learn, 'adversarial_feature', None) # AFD: the last epoch's losses, and whether the guard warned
    game = {} if adv is None else dict(d_loss=values['d_loss'], g_loss=values['g_loss'], adv_warned=int(adv.warned), adv_warned_at=adv.warned_at)
    return accs, game, time.time() - start

def result_row(regime, nets, method, tag, epochs, seed, accs, game, secs):
    "One run's CSV row: each network's accuracy (`acc_nets`), the average and the ensemble's, time, AFD's last losses and guard, torch's version"
    return dict(regime=regime, nets=nets, method=method, tag=tag, epochs=epochs, seed=seed,
                acc_avg=accs.get('acc_avg', next(iter(accs.values()))), acc_ens=accs.get('acc_ens', float('nan')),
                acc_nets=';'.join(f"{v:.4f}" for k, v in accs.items() if k not in ('acc_avg', 'acc_ens')),
                seconds=round(secs, 1), d_loss=game.get('d_loss', ''), g_loss=game.get('g_loss', ''),
                adv_warned=game.get('adv_warned', ''), adv_warned_at=_round(game.get('adv_warned_at'), 3), # the share of training done when it warned
                torch=torch.__version__) # the same seed retraces its run only under the same torch

def _round(v, digits): return '' if v is None else round(v, digits)

def _done(out):
    "The runs `out` holds under this torch (a seed retraces its run only under the same torch, so one made under another is not done)"
    if not Path(out).exists(): return set()
    runs = read_runs(out)
    runs = runs[runs.torch == torch.__version__]
    return set(zip(runs.regime, runs.nets, runs.method, runs.tag, runs.epochs, runs.seed))

def _append(out, row):
    "Append `row` to the CSV `out`; a file written before a column was added is rewritten whole with it (old rows empty)"
    new = not Path(out).exists()
    if not new and list(pd.read_csv(out, nrows=0).columns) != list(row):
        old = pd.read_csv(out, dtype=str, keep_default_na=False) # as written: an integer column stays integer
        grown = pd.concat([old, pd.DataFrame([{k: '' if v is None else str(v) for k, v in row.items()}])], ignore_index=True)
        _csv_replace(grown[list(row) + [c for c in old.columns if c not in row]], Path(out)) # atomic: a kill leaves the old file
        return
    with open(out, 'a', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new: w.writeheader()
        w.writerow(row)

@call_parse
def main(regime:str='noisy', # 'all' images with clean labels, or the demo's 'noisy' small-data regime
         nets:str='resnet20,resnet20', # zoo networks, comma-separated
         methods:str='vanilla,dml,kd,afd', # methods, comma-separated
         epochs:str='2,5', # lengths of fit_one_cycle, comma-separated
         seeds:str='0,1,2,3,4', # seeds, comma-separated
         tag:str='default', # the name of these settings in the results
         settings:str='', # other afd_learner settings, 'name=value;...'
         paper:bool=False, # the paper-faithful learners (afd_learner(paper=True))
         size:int=16, # image size
         bs:int=None, # batch size (default: the regime's, 64 for all, 32 for noisy)
         lr:float=0.05, # fit_one_cycle's maximum lr
         out:str='short_schedules.csv', # results, one row per run (appended)
         summary:str=None): # print the tables of this results file and stop
    if summary:
        print(markdown_table(paired(read_runs(summary), by=comparison_cols)))
        return
    extra = parse_settings(settings)
    if paper: extra['paper'] = True
    done = _done(out)
    name = regime if size == 16 else f"{regime}_{size}px" # the regime's name in the results
    for n_epochs in map(int, epochs.split(',')):
        for method in methods.split(','):
            for seed in map(int, seeds.split(',')):
                if (name, nets, method, tag, n_epochs, seed) in done: continue
                with warnings.catch_warnings(): # the guard's warning is recorded in the row (adv_warned)
                    warnings.simplefilter('ignore', AdversarialDivergenceWarning)
                    accs, game, secs = one_run(regime, nets.split(','), method, n_epochs, seed, size, bs, lr, **extra)
                row = result_row(name, nets, method, tag, n_epochs, seed, accs, game, secs)
                _append(out, row)
                print(f"{regime} {nets} {method}/{tag} {n_epochs} ep seed {seed}: acc_avg {100 * row['acc_avg']:.1f} "
                      f"({secs:.0f} s)", flush=True)
