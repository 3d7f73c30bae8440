"The methods the paper compares against: each step against plain PyTorch doing the same math, and each learning on digits"
import math
from copy import deepcopy
import pytest, torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from afd_fastai.all import *
from afd_fastai.tools.experiment import train_one, RunSpec


class OneStep(Callback):
    "Keep the first training batch; stop once every callback has finished its step"
    order = 90
    def before_batch(self): self.bx, self.by = self.x.clone(), self.y.clone()
    def after_step(self):
        self.last_loss = self.learn.loss.detach().clone() # fastai clears learn.loss when the fit ends
        raise CancelFitException()


def kl(student, teacher, T=3.):
    "T²·KL(σ(teacher/T) ‖ σ(student/T)), teacher detached, averaged over the batch — written out"
    p = F.softmax(teacher.detach() / T, dim=1)
    return T * T * (p * (p.log() - F.log_softmax(student / T, dim=1))).sum(1).mean()


def sgd(params, lr): return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


def one_batch():
    return digits_dls(size=16, n_per_class=3, bs=30) # one batch of 30 real images


def step_and_reference(models, method, **kwargs):
    "One fastai step of `method`; return the learner, a copy of the model from before it, the batch and the old state"
    learn = afd_learner(one_batch(), models, method=method, **{'paper': True, **kwargs}) # the paper's step: no warm-up
    ref, before = deepcopy(learn.model), deepcopy(learn.model.state_dict())
    step = OneStep()
    learn.fit(1, lr=0.05, cbs=step)
    learn.step_loss = step.last_loss
    return learn, ref, step.bx.as_subclass(torch.Tensor), step.by.as_subclass(torch.Tensor), before


def assert_same_state(got, want, before, moved=('models.0.', 'models.1.')):
    assert got.keys() == want.keys()
    for k in got: torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    for prefix in moved: # not vacuous: the step moved these
        change = max((got[k] - before[k]).abs().max().item() for k in got if k.startswith(prefix) and got[k].is_floating_point())
        assert change > 1e-4, prefix


def test_kd_step_equals_plain_pytorch():
    learn, ref, x, y, before = step_and_reference(['resnet20', 'wrn16_2', 'resnet20'], 'kd')
    nets = list(ref.models)
    opt = sgd(ref.parameters(), 0.05)
    z = [n(x) for n in nets]
    ens = torch.stack(z).mean(0)
    loss = sum(F.cross_entropy(zk, y) + kl(zk, ens) for zk in z)
    opt.zero_grad(); loss.backward(); opt.step()
    assert_same_state(learn.model.state_dict(), ref.state_dict(), before, ('models.0.', 'models.1.', 'models.2.'))


@pytest.mark.parametrize('models', [['resnet20', 'wrn16_2'], ['resnet20', 'wrn16_2', 'resnet20']])
def test_alternating_dml_equals_plain_pytorch(models):
    learn, ref, x, y, before = step_and_reference(models, 'dml_alternating')
    nets = list(ref.models)
    opt = sgd(ref.parameters(), 0.05)
    losses = []
    for k in range(len(nets)): # network k steps from a fresh forward that sees the networks already updated
        opt.zero_grad(set_to_none=True)
        z = [n(x) for n in nets]
        others = [j for j in range(len(nets)) if j != k]
        loss = F.cross_entropy(z[k], y) + sum(kl(z[k], z[j]) for j in others) / len(others)
        loss.backward(); opt.step()
        losses.append(loss.item())
    assert_same_state(learn.model.state_dict(), ref.state_dict(), before)
    assert learn.step_loss.item() == pytest.approx(sum(losses), rel=1e-5)


def test_alternating_dml_differs_from_synchronous():
    "The two forms of DML are different algorithms: after one batch the second network differs"
    states = []
    for method in ('dml', 'dml_alternating'):
        set_seed(0, reproducible=True)
        learn, *_ = step_and_reference(['resnet20', 'resnet20'], method)
        states.append(learn.model.models[1].state_dict())
    diff = max((states[0][k] - states[1][k]).abs().max().item() for k in states[0] if states[0][k].is_floating_point())
    assert diff > 1e-5
    set_seed(0, reproducible=True)
    learn, *_ = step_and_reference(['resnet20', 'resnet20'], 'dml')
    same = max((learn.model.models[1].state_dict()[k] - states[0][k]).abs().max().item() for k in states[0] if states[0][k].is_floating_point())
    assert same == 0 # the comparison itself is deterministic


def test_alternating_dml_refuses_mixed_precision(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], method='dml_alternating').to_fp16()
    with pytest.raises(ValueError, match="use method='dml'"): learn.fit(1, 0.01)


@pytest.mark.parametrize('method', ['l1', 'l1_kd'])
def test_l1_step_equals_plain_pytorch(method):
    learn, ref, x, y, before = step_and_reference(['resnet20', 'wrn16_2'], method, align_weight=0.5)
    assert [type(a.transfer).__name__ for a in ref.aligners] == ['TransferLayer', 'TransferLayer']
    nets, aligners = list(ref.models), list(ref.aligners)
    opt = sgd(ref.parameters(), 0.05) # the transfer layers are trained by the same optimiser
    f = [n.body(x) for n in nets]
    z = [n.head(fk) for n, fk in zip(nets, f)]
    loss = sum(F.cross_entropy(zk, y) for zk in z)
    if method == 'l1_kd': loss = loss + kl(z[0], z[1]) + kl(z[1], z[0])
    # edges (teacher, student): (1, 0) then (0, 1); the student's map goes through its transfer layer
    loss = loss + 0.5 * ((aligners[0].transfer(f[0]) - f[1].detach()).abs().mean()
                         + (aligners[1].transfer(f[1]) - f[0].detach()).abs().mean())
    opt.zero_grad(); loss.backward(); opt.step()
    assert_same_state(learn.model.state_dict(), ref.state_dict(), before, ('models.0.', 'models.1.', 'aligners.0.', 'aligners.1.'))
    assert learn.align_loss.item() > 0


def test_one_step_equals_plain_pytorch():
    learn, ref, x, y, before = step_and_reference(['resnet20'] * 3, 'one')
    assert isinstance(ref, OneModel) and len(learn.opt.param_lists) == 2 # bodies (shared layers, last stages), heads + gate
    opt = sgd(ref.parameters(), 0.05) # parameters() lists each shared parameter once
    low = ref.shared(x)
    z = [n.head(n.body.upper(low)) for n in ref.models]
    g = ref.gate(low)
    ens = sum(g[:, k:k + 1] * zk for k, zk in enumerate(z))
    loss = sum(F.cross_entropy(zk, y) + kl(zk, ens) for zk in z) + F.cross_entropy(ens, y)
    opt.zero_grad(); loss.backward(); opt.step()
    assert_same_state(learn.model.state_dict(), ref.state_dict(), before, ('shared.', 'gate.', 'models.1.body.upper.', 'models.2.head.'))


def test_one_learner_predicts_with_the_gated_ensemble(small_digits, tmp_path):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], method='one', path=tmp_path)
    assert [m.name for m in learn.metrics] == ['acc_resnet20_1', 'acc_resnet20_2', 'acc_avg', 'acc_ens', 'distill_loss']
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 0.05)
    values = dict(zip([m.name for m in learn.metrics], learn.recorder.values[-1][2:])) # read before get_preds resets them
    preds, targs = learn.get_preds(per_network=True)
    assert len(preds) == 3 # two branches and the gated ensemble
    torch.testing.assert_close(learn.get_preds()[0], preds[2]) # the ensemble's answer is the gated one
    acc = [(p.argmax(1) == targs).float().mean().item() for p in preds]
    assert values['acc_ens'] == pytest.approx(acc[2], abs=1e-6) and values['acc_avg'] == pytest.approx((acc[0] + acc[1]) / 2, abs=1e-6)
    item = small_digits.valid_ds.items[0]
    _, idx, probs = learn.predict(item)
    torch.testing.assert_close(probs, learn.get_preds(dl=small_digits.test_dl([item]), per_network=True)[0][2][0])
    # branch k alone is a complete network: export it and predict the same
    branch = learn.peer(1)
    branch.export(tmp_path/'branch.pkl')
    loaded = load_learner(tmp_path/'branch.pkl')
    torch.testing.assert_close(loaded.get_preds(dl=loaded.dls.test_dl([item]))[0], learn.get_preds(dl=small_digits.test_dl([item]), per_network=True)[0][1])


def test_one_refuses_different_architectures(small_digits):
    with pytest.raises(ValueError, match='same architecture'): afd_learner(small_digits, ['resnet20', 'wrn16_2'], method='one')


def _trained_teacher(dls, tmp_path):
    teacher = resnet20(10)
    learn = Learner(dls, teacher, loss_func=CrossEntropyLossFlat(), opt_func=paper_sgd, metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 0.05)
    torch.save(teacher, tmp_path/'teacher.pth')
    return teacher, learn.recorder.values[-1][2]


@pytest.mark.parametrize('method', ['kd_offline', 'l1_kd_offline'])
def test_offline_teacher_stays_frozen_and_teaches(small_digits, tmp_path, method):
    teacher, teacher_acc = _trained_teacher(small_digits, tmp_path)
    frozen = deepcopy(teacher.state_dict())
    learn = afd_learner(small_digits, 'wrn16_2', method=method, teacher=tmp_path/'teacher.pth')
    assert learn.names == ['teacher', 'wrn16_2']
    learn.unfreeze() # even after fastai's unfreeze the teacher stays fixed
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 0.05)
    for k, v in learn.model.models[0].state_dict().items(): torch.testing.assert_close(v, frozen[k], msg=k) # BN statistics too
    final = dict(zip([m.name for m in learn.metrics], learn.recorder.values[-1][2:]))
    assert final['acc_teacher'] == pytest.approx(teacher_acc, abs=1e-6)
    assert final['acc_wrn16_2'] > 0.6, final
    if method == 'l1_kd_offline': assert type(learn.model.aligners[0].transfer).__name__ == 'TransferLayer' # 128 → 64 channels


def test_offline_step_equals_plain_pytorch(small_digits, tmp_path):
    teacher, _ = _trained_teacher(small_digits, tmp_path)
    learn = afd_learner(one_batch(), ['resnet20'], method='l1_kd_offline', teacher=teacher, paper=True)
    ref, before = deepcopy(learn.model), deepcopy(learn.model.state_dict())
    step = OneStep()
    learn.fit(1, lr=0.05, cbs=step)
    x, y = step.bx.as_subclass(torch.Tensor), step.by.as_subclass(torch.Tensor)
    t_net, s_net = ref.models
    t_net.eval()
    opt = sgd(s_net.parameters(), 0.05) # only the student (same channels: no transfer layer)
    with torch.no_grad(): f_t = t_net.body(x); z_t = t_net.head(f_t)
    f_s = s_net.body(x); z_s = s_net.head(f_s)
    loss = F.cross_entropy(z_s, y) + kl(z_s, z_t) + (f_s - f_t).abs().mean()
    opt.zero_grad(); loss.backward(); opt.step()
    assert_same_state(learn.model.state_dict(), ref.state_dict(), before, ('models.1.',))


def test_offline_needs_a_teacher(small_digits):
    with pytest.raises(ValueError, match='pass teacher='): afd_learner(small_digits, ['resnet20'], method='kd_offline')
    with pytest.raises(ValueError, match='teacher= is for the offline'):
        afd_learner(small_digits, ['resnet20', 'resnet20'], method='dml', teacher=resnet20(10))


@pytest.mark.parametrize('method,models', [('kd', ['resnet20', 'wrn16_2']), ('dml_alternating', ['resnet20', 'wrn16_2']),
                                           ('one', ['resnet20', 'resnet20']), ('l1_kd', ['resnet20', 'wrn16_2']),
                                           ('one', ['resnet20'] * 3)])
def test_every_method_learns(small_digits, method, models):
    learn = afd_learner(small_digits, models, method=method)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 0.05)
    final = dict(zip([m.name for m in learn.metrics], learn.recorder.values[-1][2:]))
    assert all(v > 0.6 for k, v in final.items() if k.startswith('acc_')), final # chance is 0.1


class Targets(Callback):
    "Record the targets of every training batch"
    def before_fit(self): self.ys = []
    def before_batch(self):
        if self.training: self.ys.append(self.y.clone())


def test_methods_see_the_same_batches():
    "Fair comparisons: for one seed every method trains on the same batches in the same order (a teacher trained first too)"
    def batches(method, seed):
        rec = Targets()
        train_one(RunSpec(['resnet20', 'resnet20'], [method], epochs=2, n_per_class=10), method, seed=seed, progress=False, cbs=[rec])
        return torch.cat(rec.ys)
    seen = {m: batches(m, 3) for m in ('vanilla', 'one', 'afd', 'kd_offline')}
    assert len(seen['vanilla']) == 2 * 96 # 100 images, batches of 32, the last one dropped
    for m, ys in seen.items(): assert torch.equal(ys, seen['vanilla']), m
    assert not torch.equal(batches('vanilla', 4), seen['vanilla']) # another seed, another order
