"fastai's Learner API on a peer learner: a DML step against plain PyTorch, checkpoints, freezing, interpretation, tta"
from copy import deepcopy
import pytest, torch, torchvision
import torch.nn.functional as F
from fastcore.test import test_close as close, test_eq as equal, test_fail as fails
from fastai.callback.core import Callback, CancelFitException
from fastai.interpret import ClassificationInterpretation
from fastai.vision.learner import create_cnn_model
from afd_fastai.all import *
from torch import nn
from fastai.torch_core import set_seed


class OneStep(Callback):
    "Keep the first training batch and stop after its optimiser step"
    def before_batch(self): self.xb,self.yb = self.x.clone(),self.y.clone()
    def after_step(self): raise CancelFitException()


def plain_dml_step(nets, x, y, lr, T=3., mom=0.9, wd=1e-4):
    opt = torch.optim.SGD([p for n in nets for p in n.parameters()], lr=lr, momentum=mom, weight_decay=wd)
    logits = [n(x) for n in nets]
    loss = 0.
    for k, z in enumerate(logits):
        others = [j for j in range(len(nets)) if j != k]
        kl = 0.
        for j in others:
            p_teacher = F.softmax(logits[j].detach() / T, dim=1)
            kl = kl + (p_teacher * (p_teacher.log() - F.log_softmax(z / T, dim=1))).sum(1).mean()
        loss = loss + F.cross_entropy(z, y) + T**2 * kl / len(others)
    opt.zero_grad(); loss.backward(); opt.step()


@pytest.fixture(scope='module')
def dls(): return digits_dls(size=16, bs=64)


def test_one_dml_step_equals_a_plain_pytorch_step(dls):
    learn = afd_learner(dls, ['resnet20', 'wrn16_2', 'resnet20'], method='dml', paper=True) # the paper's step: no warm-up
    plain = [deepcopy(m) for m in learn.model.models]
    initial = deepcopy(learn.model.state_dict())
    step = OneStep()
    learn.fit(1, lr=0.05, cbs=step)
    plain_dml_step(plain, step.xb.as_subclass(torch.Tensor), step.yb.as_subclass(torch.Tensor), lr=0.05)
    for net, ref in zip(learn.model.models, plain):
        for (name, p), q in zip(net.state_dict().items(), ref.state_dict().values()): close(p, q, eps=1e-5)
    # and the step really changed the weights (so the comparison is not vacuous)
    moved = [(p - initial[name]).abs().max().item() for name, p in learn.model.state_dict().items() if p.is_floating_point()]
    assert min(moved) >= 0 and max(moved) > 1e-3 and sum(m > 0 for m in moved) > len(moved) // 2


def test_checkpoints_survive_an_interrupted_fit(dls, tmp_path):
    class StopInSecondEpoch(Callback):
        def after_batch(self):
            if self.epoch == 1 and self.iter == 2: raise RuntimeError('power cut')
    ck_learn = afd_learner(dls, ['resnet20', 'resnet20'], method='dml', path=tmp_path)
    ckpt = CheckpointCallback('run')
    class KeepEpochEnd(Callback):
        order = 71
        def after_epoch(self): self.state = deepcopy(self.learn.model.state_dict())
    keep = KeepEpochEnd()
    fails(lambda: ck_learn.fit(3, lr=0.05, cbs=[ckpt, keep, StopInSecondEpoch()]), contains='power cut')
    equal(sorted(f.name for f in (tmp_path/'models').iterdir()), ['run.pth'])
    restored = afd_learner(dls, ['resnet20', 'resnet20'], method='dml', path=tmp_path).load('run')
    for name, value in restored.model.state_dict().items(): equal(value, keep.state[name])


def pretrained_style_peers():
    "A fastai `create_cnn_model` network and a torchvision one, as users bring pretrained peers (weights not downloaded)"
    return [create_cnn_model(torchvision.models.resnet18, 10, pretrained=False), torchvision.models.resnet18(num_classes=10)]



def moved(before, after, keep):
    "Names of the floating-point entries of `after` that differ from `before`, among those `keep(name)` selects"
    return {k for k, v in after.items() if keep(k) and v.is_floating_point() and not torch.equal(v, before[k])}


@pytest.mark.parametrize('method', ['afd', 'dml'])
def test_freeze_trains_every_head_and_batchnorm(method):
    dls = digits_dls(size=32, n_per_class=12, bs=40)
    learn = afd_learner(dls, pretrained_style_peers(), method=method, **distill_methods[method].applicable(adv_lr=1e-3))
    assert learn.names == ['resnet18', 'resnet'] # the fastai model is named after the architecture found in its body
    model = learn.model
    bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    param_owner = lambda k: k.rsplit('.', 1)[0]
    heads = ('models.0.1.', 'models.1.fc.')
    learn.freeze()
    before = deepcopy(model.state_dict())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    after = model.state_dict()
    is_param = lambda k: not any(s in k for s in ('running_', 'num_batches'))
    body_weights = lambda k: k.startswith('models.') and not k.startswith(heads) and is_param(k)
    frozen_moved = moved(before, after, lambda k: body_weights(k) and param_owner(k) not in bn)
    assert frozen_moved == set(), sorted(frozen_moved)[:5] # the bodies' convolutions are frozen, for both optimisers
    assert moved(before, after, lambda k: body_weights(k) and param_owner(k) in bn) # BatchNorm trains, as in fastai
    for head in heads: assert moved(before, after, lambda k: k.startswith(head) and is_param(k)), head
    if method == 'afd': assert moved(before, after, lambda k: k.startswith('adversaries.') and is_param(k))
    learn.unfreeze()
    before = deepcopy(model.state_dict())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert moved(before, model.state_dict(), lambda k: body_weights(k) and param_owner(k) not in bn)


def test_freeze_keeps_alignment_layers_trainable_and_fine_tune_works():
    dls = digits_dls(size=16, n_per_class=12, bs=40)
    learn = afd_learner(dls, ['resnet20', 'wrn16_2'], method='l1')
    learn.freeze()
    before = deepcopy(learn.model.state_dict())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert moved(before, learn.model.state_dict(), lambda k: k.startswith('aligners.') and 'running' not in k)
    assert not moved(before, learn.model.state_dict(), lambda k: k.endswith('conv1.weight'))
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-2, freeze_epochs=1)
    assert all(p.requires_grad for p in learn.model.parameters()) # fine_tune ends unfrozen
    assert len(learn.recorder.values) == 1 # the unfrozen epoch (fine_tune's frozen one is its own fit)


def test_discriminative_learning_rates_span_bodies_to_heads():
    dls = digits_dls(size=16, n_per_class=4, bs=20)
    learn = afd_learner(dls, ['resnet20', 'wrn16_2'], method='dml')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, slice(1e-4, 1e-2))
    close([h['lr'] for h in learn.opt.hypers], [1e-4, 1e-2])
    body, head = learn.opt.param_lists
    equal({id(p) for p in head}, {id(p) for m in learn.model.models for p in m.head.parameters()})


def test_interpretation_get_preds_with_loss_tta_and_show_results(dls):
    learn = afd_learner(dls, ['resnet20', 'wrn16_2'], method='dml')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.05)
    (p0, p1), targs, losses = learn.get_preds(with_loss=True, per_network=True)
    by_hand = F.nll_loss(p0.log(), targs.long(), reduction='none') + F.nll_loss(p1.log(), targs.long(), reduction='none')
    close(losses, by_hand, eps=1e-4) # per network: the summed cross-entropies
    ens_probs, _, ens_losses = learn.get_preds(with_loss=True)
    close(ens_probs, (p0 + p1) / 2, eps=1e-6)
    close(ens_losses, -((p0 + p1) / 2).gather(1, targs.long()[:, None])[:, 0].log(), eps=1e-4) # the ensemble's: its NLL
    interp = ClassificationInterpretation.from_learner(learn) # fastai's own entry point works on the ensemble
    ens = ((p0 + p1) / 2).argmax(1)
    equal(interp.confusion_matrix().trace(), (ens == targs).sum().item())
    assert isinstance(interp.most_confused(), list)
    ours = learn.interpret()
    close(ours.losses, -((p0 + p1) / 2).gather(1, targs.long()[:, None])[:, 0].log(), eps=1e-4)
    import fastai.vision.learner # plot_top_losses for images
    ours.plot_top_losses(4)
    equal(learn.interpret('wrn16_2').confusion_matrix().trace(), (p1.argmax(1) == targs).sum().item())
    t, tt = learn.tta(n=2)
    equal(t.shape, p0.shape); equal(tt, targs)
    aug, plain = learn.tta(n=2, beta=None)[0]
    close(plain, (p0 + p1) / 2, eps=1e-5)
    learn.show_results(max_n=4) # the ensemble's predictions
    learn.peer('wrn16_2').show_results(max_n=4) # one network's, through its plain fastai Learner

def test_compiled_networks_step_as_eager_ones(tmp_path):
    from torch import nn
    from fastai.torch_core import set_seed
    "compile_networks (torch.compile in place) on small networks: the same weights after two AFD steps, checkpoints load into an eager learner"
    from afd_fastai.models import BodyHeadNet, pool_linear_head
    from afd_fastai.tools.bench import random_dls, bench_learner
    def small(): return BodyHeadNet(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()), pool_linear_head(8, 10), 'small')
    learners = []
    for compiled in (False, True):
        set_seed(0)
        learn = bench_learner(random_dls(2, bs=8, size=8, c=10), [small(), small()], 'afd', path=tmp_path)
        if compiled: learn.compile_networks()
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.05)
        learners.append(learn)
    eager, comp = learners
    for (k, a), b in zip(eager.model.state_dict().items(), comp.model.state_dict().values()): torch.testing.assert_close(a, b, msg=k)
    comp.save('compiled')
    eager.load('compiled')
    for a, b in zip(eager.model.state_dict().values(), comp.model.state_dict().values()): assert torch.equal(a, b)


KILL_CHILD = '''
import sys, torch
from afd_fastai.all import *
from torch import nn
from fastai.torch_core import set_seed
from fastai.torch_core import set_seed
set_seed(0)
learn = afd_learner(digits_dls(size=16, n_per_class=5, bs=16), ['wrn16_4', 'wrn16_4'], method='afd', path=sys.argv[1])
learn.create_opt()
ckpt = CheckpointCallback('run')
ckpt.learn = learn
first = learn.model.models[0].body[0].weight
for i in range(1000):
    with torch.no_grad(): first.fill_(float(i)) # which save a checkpoint holds
    ckpt._save('run')
    print(i, flush=True)
'''

@pytest.mark.parametrize('delay', [0.0, 0.03, 0.07, 0.13])
def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path, delay):
    "SIGKILL a process that keeps checkpointing (AFD, both optimisers): the file on disk always loads, from the last save or the one after"
    import subprocess, sys, time, signal
    child = subprocess.Popen([sys.executable, '-c', KILL_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        saved = [int(child.stdout.readline())] # the first save is complete
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
    rest, _ = child.communicate()
    saved += [int(l) for l in rest.split()]
    learn = afd_learner(digits_dls(size=16, n_per_class=5, bs=16), ['wrn16_4', 'wrn16_4'], method='afd', path=tmp_path)
    learn.create_opt()
    learn.load('run') # with both optimisers' states
    held = learn.model.models[0].body[0].weight
    assert held.min() == held.max() and int(held[0, 0, 0, 0]) in (saved[-1], saved[-1] + 1), (held.flatten()[:3], saved[-3:])


def resumable_learner(path, seed=0):
    "AFD (both optimisers) with dropout, on shuffled CIFAR-shaped data with pad-crop-flip: every random generator in use"
    from afd_fastai.models import BodyHeadNet, pool_linear_head
    set_seed(seed)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 4, (96,), generator=g)
    dls = cifar_tensor_dls(x[:64], y[:64], x[64:], y[64:], names=list('abcd'), bs=16)
    def net(): return BodyHeadNet(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3)),
                                  pool_linear_head(8, 4), 'small')
    return afd_learner(dls, [net(), net()], method='afd', path=path, adv_lr=1e-3, cbs=AdversarialBackoff(patience=2))

def same(a, b, where='state'):
    "Assert that two nested states (dicts, lists, tensors, numbers) are equal, bit for bit"
    if isinstance(a, torch.Tensor): assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a: same(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)): same(u, v, f'{where}[{i}]')
    else: assert a == b, (where, a, b)

def whole_and_resumed(tmp_path, fit, stop_epoch:int=1):
    "`fit(learn, *cbs)` run whole, and run again cut by a power cut in epoch `stop_epoch`, then resumed in a fresh learner from another seed"
    class PowerCut(Callback):
        def after_batch(self):
            if self.epoch == stop_epoch and self.iter == 1: raise RuntimeError('power cut')
    whole = resumable_learner(tmp_path/'whole')
    fit(whole, CheckpointCallback('run'))
    fails(lambda: fit(resumable_learner(tmp_path/'cut'), CheckpointCallback('run', resume=True), PowerCut()), contains='power cut')
    resumed = resumable_learner(tmp_path/'cut', seed=123) # another process: other weights, other random state
    fit(resumed, CheckpointCallback('run', resume=True))
    return whole, resumed

@pytest.mark.parametrize('stop_epoch', [1, 2])
def test_a_resumed_fit_ends_exactly_as_an_uninterrupted_one(tmp_path, stop_epoch):
    "Interrupted in epoch `stop_epoch`, resumed in a fresh learner from another seed: weights and both optimisers bitwise those of one fit"
    def fit(learn, *cbs):
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 0.05, cbs=list(cbs))
    whole, resumed = whole_and_resumed(tmp_path, fit, stop_epoch)
    same(whole.model.state_dict(), resumed.model.state_dict(), 'model')
    same(whole.opt.state_dict(), resumed.opt.state_dict(), 'opt')
    assert whole.opt.second is not None and len(whole.recorder.d_losses) > 0
    equal(whole.recorder.values[-1], resumed.recorder.values[-1]) # the last epoch's losses and metrics too

def test_resume_refuses_a_checkpoint_it_cannot_continue(tmp_path):
    learn = resumable_learner(tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.05, cbs=CheckpointCallback('run'))
    again = resumable_learner(tmp_path)
    fails(lambda: again.fit(2, 0.05, cbs=CheckpointCallback('run', resume=True)), contains='same number of epochs')
    learn.save('weights_only', with_opt=False)
    fails(lambda: again.fit(1, 0.05, cbs=CheckpointCallback('weights_only', resume=True)), contains='holds no training state')
    fails(lambda: CheckpointCallback('run', with_opt=False, resume=True), contains='keep with_opt=True')

def test_peers_on_their_own_devices():
    "devices=: on a machine with two GPUs, each network on its own and AFD trains; elsewhere a clear refusal, and CPU placement trains"
    dls = digits_dls(size=16, n_per_class=10, bs=16)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= 2:
        learn = afd_learner(dls.to('cuda:0') if hasattr(dls, 'to') else dls, ['resnet20', 'resnet20'], devices=['cuda:0', 'cuda:1'])
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.05)
        assert [next(n.parameters()).device for n in learn.model.models] == [torch.device('cuda:0'), torch.device('cuda:1')]
        assert next(learn.model.adversaries.parameters()).device == torch.device('cuda:0')
    else:
        fails(lambda: afd_learner(dls, ['resnet20', 'resnet20'], devices=['cuda:0', 'cuda:1']), contains=f'this machine has {count} CUDA device')
    def trained(devices):
        set_seed(0)
        learn = afd_learner(digits_dls(size=16, n_per_class=10, bs=16), ['resnet20', 'resnet20'], method='afd', devices=devices)
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.05)
        return learn
    one, placed = trained(None), trained(['cpu', 'cpu'])
    for (k, a), b in zip(one.model.state_dict().items(), placed.model.state_dict().values()): assert torch.equal(a, b), k
    fails(lambda: afd_learner(dls, ['resnet20', 'resnet20'], method='one', devices=['cpu', 'cpu']), contains='share layers')

def test_resume_beside_gradient_accumulation_and_clip(tmp_path):
    "CheckpointCallback(resume=True) with fastai's GradientAccumulation and GradientClip: the resumed fit still ends bit for bit as one fit"
    from fastai.callback.training import GradientAccumulation, GradientClip
    def fit(learn, *cbs):
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(3, 0.05, cbs=[GradientAccumulation(32), GradientClip(1.), *cbs])
    whole, resumed = whole_and_resumed(tmp_path, fit)
    same(whole.model.state_dict(), resumed.model.state_dict(), 'model')
    same(whole.opt.state_dict(), resumed.opt.state_dict(), 'opt')

def test_resume_beside_fastai_trackers(tmp_path):
    "ReduceLROnPlateau and EarlyStoppingCallback beside CheckpointCallback(resume=True): they sleep through the epochs done before, keep what they had seen, and a finished fit resumes to itself"
    from fastai.callback.tracker import ReduceLROnPlateau, EarlyStoppingCallback
    def fit(learn, *cbs):
        trackers = [ReduceLROnPlateau(monitor='valid_loss', patience=1, factor=10.), EarlyStoppingCallback(patience=5)]
        with learn.no_bar(), learn.no_logging(): learn.fit(3, 0.05, cbs=trackers + list(cbs))
    whole, resumed = whole_and_resumed(tmp_path, fit, stop_epoch=2)
    same(whole.model.state_dict(), resumed.model.state_dict(), 'model')
    equal(whole.recorder.values, resumed.recorder.values)
    done = resumable_learner(tmp_path/'cut', seed=7) # every epoch done: nothing trains, the records come back
    fit(done, CheckpointCallback('run', resume=True))
    same(whole.model.state_dict(), done.model.state_dict(), 'model')
    equal(whole.recorder.values, done.recorder.values)

def test_resume_beside_validate_every(tmp_path):
    "ValidateEvery(2) beside CheckpointCallback(resume=True): the epochs a resumed fit skips log nothing broken, and it ends as one fit"
    from afd_fastai.tools.experiment import ValidateEvery
    def fit(learn, *cbs):
        with learn.no_bar(): learn.fit_one_cycle(4, 0.05, cbs=[ValidateEvery(2), *cbs]) # logging on: the logger is ValidateEvery's
    whole, resumed = whole_and_resumed(tmp_path, fit, stop_epoch=2)
    same(whole.model.state_dict(), resumed.model.state_dict(), 'model')
    equal(whole.recorder.values[-1], resumed.recorder.values[-1])

def test_a_resumed_fit_logs_only_the_epochs_it_trains(tmp_path):
    "The epochs a resumed fit skips print no rows: its table goes on from the epoch where the fit was cut, with the row one fit prints"
    calls = []
    def fit(learn, *cbs):
        rows = []; calls.append(rows)
        learn.logger = lambda row: rows.append(list(row))
        with learn.no_bar(): learn.fit_one_cycle(3, 0.05, cbs=list(cbs))
    whole_and_resumed(tmp_path, fit, stop_epoch=2)
    whole, cut, resumed = calls
    epochs = lambda rows: [r[0] for r in rows if isinstance(r[0], int)]
    assert epochs(whole) == [0, 1, 2] and epochs(cut) == [0, 1] and epochs(resumed) == [2], (whole, resumed)
    assert all(len(r) == len(whole[-1]) for r in resumed if isinstance(r[0], int)) # no short rows
    equal(resumed[-1][:-1], whole[-1][:-1]) # the same losses and metrics (all but the time)
