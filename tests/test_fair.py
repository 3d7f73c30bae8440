"""The fairness methods against plain PyTorch (each loss written out here, not read from the library), fastai's own
callbacks beside them, and the fairness data sets through `afd_train`."""
from copy import deepcopy
from functools import partial
import subprocess, sys, contextlib, warnings
import pytest, torch
import torch.nn.functional as F
from fastcore.test import test_close as close, test_fail as fails
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientClip
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from afd_fastai.all import *
from afd_fastai.fairness.data import digits_s_dls
from afd_fastai.groups import GroupTarget
from afd_fastai.models import cifar10s_net


class OneStep(Callback):
    "Keep the first training batch (after GroupTarget) and stop after the optimiser step"
    order = 1
    def before_batch(self): self.x0,self.y0,self.g0 = self.x.clone(),self.y.clone(),self.learn.group.clone()
    def after_step(self): raise CancelFitException()


@pytest.fixture(scope='module')
def dls(): return digits_s_dls(bs=32, seed=0, n_per_class=40)

net = partial(cifar10s_net, size=16, drop=0.) # no BatchNorm, no dropout: a step is deterministic


@pytest.fixture(scope='module')
def teacher(dls):
    t = net()
    learn = Learner(dls, t, loss_func=CrossEntropyLossFlat(), cbs=GroupTarget())
    with learn.no_bar(), learn.no_logging(): learn.fit(8, 1e-3)
    return t


def kl(s, t, T):
    p = F.softmax(t / T, 1)
    return T * T * (p * (p.log() - F.log_softmax(s / T, 1))).sum(1).mean()

def mmd_by_cells(ft, fs, y, g, sigma=1.):
    d = lambda a, b: torch.cdist(a, b) ** 2
    bw = 2 * sigma * d(ft, fs).clamp_min(1e-12).mean().detach()
    k = lambda a, b: torch.exp(-d(a, b) / bw).mean()
    out = 0.
    for c in y.unique():
        tc = ft[y == c]
        for gg in g[y == c].unique():
            sc = fs[(y == c) & (g == gg)]
            out = out + k(tc, tc) + k(sc, sc) - 2 * k(tc, sc)
    return out / 2

def attention(f): return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)

def nst(fs, ft):
    fs, ft = F.normalize(fs.flatten(2), dim=2), F.normalize(ft.flatten(2), dim=2)
    k = lambda a, b: (a @ b.transpose(1, 2)).pow(2).mean((1, 2))
    return (k(fs, fs) + k(ft, ft) - 2 * k(fs, ft)).mean()

def plain_loss(method, student, teacher, x, y, g, T=1., adv=None, lam_ad=1e-3):
    "The student's loss of `method` written out: (loss, adversaries' loss on detached logits)"
    feats = {}
    hooks = [m.get_submodule(name).register_forward_hook(lambda mod, i, o, key=key: feats.__setitem__(key, o))
             for key, m in (('s', student), ('t', teacher)) for name in (('head.2', 'body'))]
    try:
        z = student(x)
        with torch.no_grad(): zt = teacher(x)
    finally:
        for h in hooks: h.remove()
    ce = F.cross_entropy(z, y)
    if method == 'hkd': return ce + 4 * kl(z, zt, T), None # λ_h starts at 4 (the authors')
    if method == 'fitnet_hints': return F.mse_loss(feats['s'], feats['t']) / 2, None # the first fit: the hint alone
    if method == 'fitnet': return ce + 4 * kl(z, zt, T), None # the second fit: CE + HKD, no hint
    if method == 'fitnet_one_stage': return ce + 4 * kl(z, zt, T) + F.mse_loss(feats['s'], feats['t']) / 2, None
    if method == 'mfd': return ce + 3 * mmd_by_cells(feats['t'], feats['s'], y, g), None
    if method in ('at', 'nst'):
        hooks = [m.body.register_forward_hook(lambda mod, i, o, key=key: feats.__setitem__(key, o)) for key, m in (('sb', student), ('tb', teacher))]
        student(x); teacher(x)
        for h in hooks: h.remove()
        z = student(x); ce = F.cross_entropy(z, y)
        if method == 'at': return ce + 0.5 * (attention(feats['sb']) - attention(feats['tb'].detach())).pow(2).mean(), None
        return ce + 30 * nst(feats['sb'], feats['tb'].detach()), None
    if method == 'ad':
        per_class = lambda logits: sum(F.cross_entropy(adv[c](logits[y == c]), g[y == c]) for c in y.unique().tolist())
        return ce - lam_ad * per_class(z), per_class(z.detach()) # the student receives −λ·∇Σ_c CE_c (the authors' code)
    raise ValueError(method)


@pytest.mark.parametrize('method', ['hkd', 'fitnet_hints', 'fitnet', 'fitnet_one_stage', 'at', 'nst', 'mfd', 'ad'])
def test_one_step_equals_plain_pytorch(dls, teacher, method):
    learn = afd_learner(dls, net, method=method.replace('_hints', ''), teacher=teacher, lr=0.05)
    student, frozen = deepcopy(learn.model.models[1]), deepcopy(teacher).eval()
    adv = deepcopy(learn.model.group_adversaries.mlps) if method == 'ad' else None
    before = deepcopy(learn.model.models[1].state_dict())
    step = OneStep()
    with hint_stage(learn) if method == 'fitnet_hints' else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter('ignore') # fitnet without its hint stage warns
        learn.fit(1, lr=0.05, cbs=step)
    x, y, g = (t.as_subclass(torch.Tensor) for t in (step.x0, step.y0, step.g0))
    sgd = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss, adv_loss = plain_loss(method, student, frozen, x, y, g, adv=adv)
    sgd.zero_grad(); loss.backward(); sgd.step()
    for (name, p), q in zip(learn.model.models[1].state_dict().items(), student.state_dict().values()): close(p, q, eps=1e-5)
    assert max((p - before[n]).abs().max().item() for n, p in learn.model.models[1].state_dict().items()) > 5e-6 # more than weight decay alone
    for p, q in zip(learn.model.models[0].parameters(), frozen.parameters()): assert torch.equal(p, q) # frozen (a copy from before the step)
    if adv is not None: # the adversaries' own Adam on the gradient of Σ_c CE_c
        adam = torch.optim.Adam(adv.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=1e-5)
        adam.zero_grad(); adv_loss.backward(); adam.step()
        for p, q in zip(learn.model.group_adversaries.mlps.parameters(), adv.parameters()): close(p, q, eps=1e-5)


def test_the_adversaries_learn_and_the_student_keeps_learning(dls, teacher):
    import math
    from fastai.optimizer import Adam
    learn = afd_learner(dls, net, method='ad', teacher=teacher, opt_func=Adam, lr=1e-3, wd=0.) # the paper's λ = 1e-3
    with learn.no_bar(), learn.no_logging(): learn.fit(10, 1e-3, cbs=GradientClip(1.))
    last = learn.recorder.values[-1]
    assert last[5] > 0.5, last # the student's accuracy
    # Σ over 10 classes of the adversaries' cross-entropy: untrained adversaries guess at chance (10·log 2 = 6.9); these
    # have learned at least how skewed each class's groups are (the prior alone gives 10·H(0.9) ≈ 3.3)
    assert last[-2] < 0.75 * 10 * math.log(2), last


def test_labelwise_sampling_only_during_the_fit(dls, teacher):
    learn = afd_learner(dls, net, method='ss', teacher=teacher)
    seen = []
    class Peek(Callback):
        def before_batch(self): seen.extend(zip(self.y.tolist(), self.learn.group.tolist()))
    original = learn.dls.train
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.05, cbs=Peek())
    assert learn.dls.train is original
    share_minor = sum((y < 5) == (g == 1) for y, g in seen) / len(seen) # gray 5–9 and colour 0–4: 10 % of the data
    assert 0.35 < share_minor < 0.65, share_minor


def test_lr_find_and_get_preds_compose(dls, teacher):
    learn = afd_learner(dls, net, method='mfd', teacher=teacher)
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=5, show_plot=False)
        learn.fit(1, 0.01)
    assert learn.opt is not None and learn.dls.train.__class__.__name__ == 'TfmdDL'
    preds, targs = learn.get_preds(per_network=True)
    assert len(preds) == 2 and targs.max() < 10 and len(targs) == len(dls.valid_ds) # the class only, never the group


def afd_train(*args, cwd):
    return subprocess.run([sys.executable, '-m', 'afd_fastai.tools.cli', *args], cwd=cwd, capture_output=True, text=True)


def test_cli_on_digits_s_reports_deo(tmp_path):
    from afd_fastai.tools.cli import main
    main(['--data', 'digits_s', '--method', 'scratch,mfd', '--epochs', '1', '--seed', '0', '--n_per_class', '20', '--out', str(tmp_path)])
    text = (tmp_path/'results.md').read_text()
    assert 'deo_m_cifar10s_net' in text and 'digits-S 16×16' in text and '| mfd | 1 |' in text
    assert len(list((tmp_path/'models').glob('teacher_*'))) == 1 # one teacher per seed, for both methods


def test_cli_refuses_group_methods_without_groups(capsys):
    from afd_fastai.tools.cli import main
    with pytest.raises(SystemExit): main(['--method', 'mfd'])
    assert 'need(s) a sensitive group' in capsys.readouterr().err


def test_preset_on_fake_cifar10s(tmp_path):
    from afd_fastai.tools.cli import main
    write_fake_cifar(tmp_path/'data', 10, n_train=64, n_test=16)
    main(['--preset', 's2-cifar10s-mfd', '--data-path', str(tmp_path/'data'), '--epochs', '1', '--bs', '16', '--seed', '0',
          '--out', str(tmp_path/'out')])
    text = (tmp_path/'out'/'results.md').read_text()
    assert 'Beside the paper' in text and '82.77' in text and 'deo_m_cifar10s_net' in text


@pytest.mark.parametrize('method', ['mfd', 'ad'])
def test_stock_callbacks_compose(dls, teacher, method, tmp_path):
    "fine_tune (freeze, then unfreeze), SaveModelCallback, GradientClip and to_fp16 beside a fairness method"
    from fastai.callback.tracker import SaveModelCallback
    learn = afd_learner(dls, net, method=method, teacher=teacher, path=tmp_path).to_fp16() # on CPU autocast is off: composition only
    frozen_teacher = deepcopy(teacher.state_dict())
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(1, 1e-3, freeze_epochs=1, cbs=[SaveModelCallback(fname='best', with_opt=True), GradientClip(1.)])
    for k, v in learn.model.models[0].state_dict().items(): assert torch.equal(v, frozen_teacher[k]) # the teacher never moves
    assert learn.dls.train.__class__.__name__ == 'TfmdDL'
    other = afd_learner(dls, net, method=method, teacher=teacher, path=tmp_path)
    other.load('best', with_opt=True)
    if method == 'ad': assert other.opt.second is not None # the adversaries' Adam comes back with the checkpoint
    assert all(torch.isfinite(v).all() for v in other.model.state_dict().values() if v.is_floating_point())


def test_stock_callbacks_compose_with_fitnet_stages(dls, teacher, tmp_path):
    "FitNet's hint stage with GradientAccumulation and GradientClip, then fine_tune with SaveModelCallback, under to_fp16"
    from fastai.callback.tracker import SaveModelCallback
    from fastai.callback.training import GradientAccumulation
    learn = afd_learner(dls, net, method='fitnet', teacher=teacher, path=tmp_path).to_fp16() # on CPU autocast is off: composition only
    frozen_teacher = deepcopy(teacher.state_dict())
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.filterwarnings('error', message="FitNet's hint stage has not run") # it ran: the fits after it do not warn
        learn.fit_hints(1, 1e-3, cbs=[GradientAccumulation(2 * dls.bs), GradientClip(1.)])
        assert learn.opt is None # the next fit starts a fresh optimiser
        learn.fine_tune(1, 1e-3, freeze_epochs=1, cbs=[SaveModelCallback(fname='best', with_opt=True), GradientClip(1.)])
    for k, v in learn.model.models[0].state_dict().items(): assert torch.equal(v, frozen_teacher[k]) # the teacher never moves
    other = afd_learner(dls, net, method='fitnet', teacher=teacher, path=tmp_path)
    other.load('best', with_opt=True)
    assert all(torch.isfinite(v).all() for v in other.model.state_dict().values() if v.is_floating_point())

def test_a_run_trains_fitnet_in_two_fits_and_resumes(teacher, tmp_path):
    "train_one: FitNet's hint stage as a fit of its own (E/2 epochs, its own checkpoint), then E epochs of CE + HKD; resume keeps both"
    from afd_fastai.tools.experiment import RunSpec, train_one
    spec = RunSpec([net, net], ['fitnet'], data='digits_s', epochs=2, bs=32, n_per_class=20, size=16)
    seen = []
    class Stages(Callback):
        def before_fit(self): seen.append((self.n_epoch, getattr(self.learn, 'hint_stage', False)))
    learn, row = train_one(spec, 'fitnet', 0, progress=False, out=tmp_path, teacher=teacher, cbs=[Stages()])
    assert seen == [(1, True), (2, False)], seen # the hint alone for 1 epoch, then the second fit
    assert (tmp_path/'models'/'fitnet_seed0_hints.pth').exists() and (tmp_path/'models'/'fitnet_seed0.pth').exists()
    hints = [v[-2] for v in learn.recorder.values]
    assert all(h is None for h in hints), hints # the second fit has no hint
    seen.clear()
    again, row2 = train_one(spec, 'fitnet', 0, progress=False, out=tmp_path, teacher=teacher, cbs=[Stages()], resume=True)
    for p, q in zip(again.model.parameters(), learn.model.parameters()): assert torch.equal(p, q) # both fits were done
    assert row2['acc_cifar10s_net'] == row['acc_cifar10s_net']

def test_tsne_script_embeds_the_students_of_a_run(tmp_path):
    "benchmarks/fairness_tsne.py reads a run's students (each as accurate as the run reported) and embeds a balanced test draw"
    import sys, pandas as pd
    from pathlib import Path
    from afd_fastai.tools.cli import afd_train
    from afd_fastai.tools.experiment import make_dls
    sys.path.insert(0, str(Path(__file__).parents[1]/'benchmarks'))
    import fairness_tsne
    afd_train.__wrapped__(data='fashion_mnist_s', method='scratch,mfd', seed='0', epochs=1, bs=16, n_per_class=5, size=16, out=str(tmp_path))
    runs = pd.read_csv(tmp_path/'runs.csv').set_index('method')
    dls = make_dls('fashion_mnist_s', seed=0, bs=16, n_per_class=5, size=16)
    for method in ('scratch', 'mfd'):
        net = fairness_tsne.saved_student(tmp_path/'models'/f'{method}_seed0.pth', 16)
        with torch.no_grad(): correct = sum(int((net(x.cpu()).argmax(1) == y.cpu()).sum()) for x, y, g in dls.valid)
        assert abs(correct / len(dls.valid.dataset) - runs.loc[method, 'acc_cifar10s_net']) < 1e-6
    fairness_tsne.main(str(tmp_path), methods='scratch,mfd', per_cell=8, out=str(tmp_path/'tsne.csv'))
    emb = pd.read_csv(tmp_path/'tsne.csv')
    assert emb.groupby(['method', 'cls', 'group']).size().eq(8).all() and len(emb) == 2 * 10 * 2 * 8
    assert emb.group_probe.between(0, 1).all() and emb[['x', 'y']].notna().all().all()
