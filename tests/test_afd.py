"AFD (the paper's settings, paper=True) against a plain-PyTorch implementation of the same math, and AFD with the rest of fastai; the library's defaults are checked against plain PyTorch in test_fidelity"
import math
from copy import deepcopy
import pytest, torch
import torch.nn.functional as F
from fastai.learner import load_learner
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import SaveModelCallback
from fastai.torch_core import set_seed
from afd_fastai.all import *


class OneStep(Callback):
    "Keep the first training batch; stop once every callback has finished its step"
    order = 90
    def before_batch(self): self.bx, self.by = self.x.clone(), self.y.clone()
    def after_step(self): raise CancelFitException()


def plain_afd_step(model, x, y, edges, lr, adv_lr, T=3., kd=True, wd=1e-4, adv_wd=0.1):
    """One AFD step written in plain PyTorch: SGD on CE + T²·KL, Adam on the LSGAN losses, one forward.
    `model.models[k]` is `Sequential(body, head)`; `model.adversaries[e]` has `.transfer` and `.discriminator`
    for edge `edges[e] = (teacher, student)`."""
    nets, advs = list(model.models), list(model.adversaries)
    net_params = [p for n in nets for p in n.parameters()]
    transfer_params = [p for a in advs for p in a.transfer.parameters()]
    disc_params = [p for a in advs for p in a.discriminator.parameters()]
    sgd = torch.optim.SGD(net_params, lr=lr, momentum=0.9, weight_decay=wd)
    adam = torch.optim.Adam(net_params + transfer_params + disc_params, lr=adv_lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=adv_wd)
    feats = [n.body(x) for n in nets]
    logits = [n.head(f) for n, f in zip(nets, feats)]
    teachers = {s: [t for t, s2 in edges if s2 == s] for s in range(len(nets))}
    logit_loss = sum(F.cross_entropy(z, y) for z in logits)
    if kd:
        for s, ts in teachers.items():
            kl = 0.
            for t in ts:
                p_t = F.softmax(logits[t].detach() / T, dim=1)
                kl = kl + (p_t * (p_t.log() - F.log_softmax(logits[s] / T, dim=1))).sum(1).mean()
            logit_loss = logit_loss + T * T * kl / len(ts)
    g_terms, d_loss = {s: [] for s in teachers}, 0.
    for (t, s), adv in zip(edges, advs):
        fake = adv.discriminator(adv.transfer(feats[s]))
        real = adv.discriminator(feats[t].detach())
        g_terms[s].append(((1 - fake) ** 2).mean())
        d_loss = d_loss + ((1 - real) ** 2).mean() + (fake ** 2).mean()
    g_loss = sum(sum(v) / len(v) for v in g_terms.values() if v)
    gen = net_params + transfer_params
    g_grads = torch.autograd.grad(g_loss, gen, retain_graph=True, allow_unused=True)
    d_grads = torch.autograd.grad(d_loss, disc_params, retain_graph=True)
    sgd.zero_grad(); logit_loss.backward(); sgd.step()
    adam.zero_grad(set_to_none=True)
    for p, g in zip(gen + disc_params, list(g_grads) + list(d_grads)): p.grad = g
    adam.step()
    return d_loss.item(), g_loss.item()


@pytest.mark.parametrize('models,method,n_adv', [
    (['resnet20', 'resnet20'], 'afd', 2),                # same architecture
    (['resnet20', 'wrn16_2'], 'afd', 2),                 # 64 vs 128 channels: transfer layers
    (['resnet20', 'wrn16_2', 'resnet20'], 'afd', 3),     # three networks, cyclic: K discriminators
    (['resnet20', 'wrn16_2'], 'afd_adv_only', 2),        # the ablation without KD
])
def test_one_afd_step_equals_plain_pytorch(models, method, n_adv):
    dls = digits_dls(size=16, n_per_class=3, bs=30) # one batch of 30 real images
    learn = afd_learner(dls, models, method=method, adv_lr=1e-3, paper=True)
    assert len(learn.model.adversaries) == n_adv
    ref = deepcopy(learn.model)
    before = deepcopy(learn.model.state_dict())
    step = OneStep()
    learn.fit(1, lr=0.05, cbs=step)
    x, y = step.bx.as_subclass(torch.Tensor), step.by.as_subclass(torch.Tensor)
    d_loss, g_loss = plain_afd_step(ref, x, y, ref.adversary_edges, lr=0.05, adv_lr=1e-3, kd=method == 'afd')
    assert learn.recorder.d_losses[0] == pytest.approx(d_loss, rel=1e-5)
    assert learn.recorder.g_losses[0] == pytest.approx(g_loss, rel=1e-5)
    got, want = learn.model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and any(k.startswith('adversaries.') for k in got)
    for k in got: torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    # not vacuous: networks, transfer layers and discriminators all moved
    for prefix in ['models.0.body.', 'models.1.body.', 'adversaries.0.discriminator.', 'adversaries.1.discriminator.']:
        moved = max((got[k] - before[k]).abs().max().item() for k in got if k.startswith(prefix) and got[k].is_floating_point())
        assert moved > 1e-4, prefix
    if models[1] == 'wrn16_2':
        moved = max((got[k] - before[k]).abs().max().item() for k in got if '.transfer.' in k and got[k].is_floating_point())
        assert moved > 1e-4


def test_second_optimiser_never_touches_heads_or_learn_opt(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], adv_lr=1e-2, paper=True)
    heads = deepcopy([m.head.state_dict() for m in learn.model.models])
    # with the first optimiser's lr at 0 only the second optimiser moves anything: heads get no adversarial gradient
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0.)
    for m, h in zip(learn.model.models, heads):
        for k, v in m.head.state_dict().items(): torch.testing.assert_close(v, h[k])
    adv_ids = {id(p) for p in learn.model.adversaries.parameters()}
    assert not adv_ids & {id(p) for p in learn.opt.all_params().itemgot(0)}


def test_validation_never_touches_the_discriminators(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], paper=True)
    calls = []
    hooks = [a.discriminator.register_forward_hook(lambda *_: calls.append(1)) for a in learn.model.adversaries]
    before = deepcopy(learn.model.adversaries.state_dict())
    learn.validate(); learn.get_preds(); learn.predict(small_digits.valid_ds.items[0])
    assert calls == [] and learn.adversarial_feature.adv_opt is None
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    n_train = len(calls)
    assert n_train == 2 * 2 * len(small_digits.train) # each batch: a fake and a real score per discriminator
    trained = deepcopy(learn.model.adversaries.state_dict())
    learn.validate(); learn.get_preds()
    assert len(calls) == n_train
    for k, v in learn.model.adversaries.state_dict().items(): torch.testing.assert_close(v, trained[k])
    assert any(not torch.equal(v, before[k]) for k, v in trained.items())
    for h in hooks: h.remove()


@pytest.mark.parametrize('paper', [True, False])
def test_lr_find_neither_creates_nor_steps_the_second_optimiser(small_digits, paper):
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], paper=paper)
    before = deepcopy(learn.model.state_dict())
    with learn.no_bar(): learn.lr_find(num_it=8, show_plot=False)
    assert learn.adversarial_feature.adv_opt is None
    for k, v in learn.model.state_dict().items(): torch.testing.assert_close(v, before[k])
    # after a fit the second optimiser exists; lr_find must leave its state as it was
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    opt_state = deepcopy(learn.adversarial_feature.adv_opt.state_dict())
    model_state = deepcopy(learn.model.state_dict())
    with learn.no_bar(): learn.lr_find(num_it=8, show_plot=False)
    for k, v in learn.model.state_dict().items(): torch.testing.assert_close(v, model_state[k])
    torch.testing.assert_close(learn.adversarial_feature.adv_opt.state_dict()['state'], opt_state['state'])


def _resume_setup(tmp_path):
    dls = digits_dls(size=16, n_per_class=8, bs=16)
    dls.train.shuffle = False # a data order that does not depend on how many epochs ran in this process
    return dls

class StopAfterEpoch(Callback):
    order = 80 # after CheckpointCallback
    def __init__(self, epoch): self.stop_epoch = epoch
    def after_epoch(self):
        if self.epoch == self.stop_epoch: raise CancelFitException()

@pytest.mark.parametrize('paper', [True, False])
def test_save_load_continue_equals_uninterrupted(tmp_path, paper):
    dls = _resume_setup(tmp_path)
    set_seed(1)
    straight = afd_learner(dls, ['resnet20', 'wrn16_2'], adv_lr=1e-3, path=tmp_path, paper=paper)
    init = deepcopy(straight.model.state_dict())
    with straight.no_bar(), straight.no_logging(): straight.fit_one_cycle(4, 0.05)

    first = afd_learner(dls, ['resnet20', 'wrn16_2'], adv_lr=1e-3, path=tmp_path, paper=paper)
    first.model.load_state_dict(init)
    with first.no_bar(), first.no_logging():
        first.fit_one_cycle(4, 0.05, cbs=[CheckpointCallback('ck'), StopAfterEpoch(1)]) # stops after 2 of 4 epochs
    resumed = afd_learner(dls, ['resnet20', 'wrn16_2'], adv_lr=1e-3, path=tmp_path, paper=paper).load('ck')
    cb = resumed.adversarial_feature
    assert cb.adv_opt is not None and cb.adv_opt.hypers[0]['lr'] == pytest.approx(1e-4) # 25 % milestone passed
    with resumed.no_bar(), resumed.no_logging(): resumed.fit_one_cycle(4, 0.05, start_epoch=2)
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, straight.model.state_dict()[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(cb.adv_opt.state_dict()['state'], straight.adversarial_feature.adv_opt.state_dict()['state'],
                               rtol=1e-4, atol=1e-6)
    # and without the second optimiser's state the resumed run would differ: the check can fail
    fresh = afd_learner(dls, ['resnet20', 'wrn16_2'], adv_lr=1e-3, path=tmp_path, paper=paper).load('ck', with_opt=False)
    with fresh.no_bar(), fresh.no_logging(): fresh.fit_one_cycle(4, 0.05, start_epoch=2)
    assert any(not torch.allclose(v, straight.model.state_dict()[k], rtol=1e-4, atol=1e-5)
               for k, v in fresh.model.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize('paper', [True, False])
def test_save_model_callback_keeps_the_second_optimiser(small_digits, tmp_path, paper):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], path=tmp_path, paper=paper)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 0.02, cbs=SaveModelCallback(fname='best', with_opt=True))
    state = torch.load(tmp_path/'models'/'best.pth', weights_only=False)
    assert set(state) == {'model', 'opt'} and state['opt']['second'] is not None # fastai's format, both optimisers in 'opt'
    assert any(k.startswith('adversaries.') for k in state['model'])
    other = afd_learner(small_digits, ['resnet20', 'resnet20'], path=tmp_path, paper=paper).load('best')
    torch.testing.assert_close(other.adversarial_feature.adv_opt.state_dict()['state'], state['opt']['second']['state'])


def test_checkpoint_of_the_previous_version_still_loads(small_digits, tmp_path):
    "afd_fastai 0.0.1 wrote {'model', 'opt', 'callbacks': {'adversarial_feature': {'opt', ...}}}"
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], path=tmp_path, paper=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    opt = learn.opt.state_dict()
    second = opt.pop('second')
    (tmp_path/'models').mkdir(exist_ok=True)
    torch.save({'model': learn.model.state_dict(), 'opt': opt,
                'callbacks': {'adversarial_feature': {'opt': second, 'scale': None, 'good_steps': 0}}}, tmp_path/'models'/'old.pth')
    other = afd_learner(small_digits, ['resnet20', 'resnet20'], path=tmp_path, paper=True).load('old')
    for k, v in other.model.state_dict().items(): torch.testing.assert_close(v, learn.model.state_dict()[k])
    torch.testing.assert_close(other.adversarial_feature.adv_opt.state_dict()['state'], second['state'])
    torch.save({'something': 'else'}, tmp_path/'models'/'bad.pth') # anything else still fails as fastai fails
    with pytest.raises(ValueError, match='does not fit this learner'): other.load('bad') # a clear error, not the state_dict's


def test_afd_learns_and_losses_stay_finite(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], paper=True)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 0.05)
    final = dict(zip(learn.recorder.metric_names[3:-1], learn.recorder.values[-1][2:]))
    for name in ['acc_resnet20', 'acc_wrn16_2', 'acc_avg', 'acc_ens']: assert final[name] > 0.6, (name, final)
    losses = torch.tensor(list(learn.recorder.d_losses) + list(learn.recorder.g_losses))
    assert torch.isfinite(losses).all() and len(losses) == 2 * 4 * len(small_digits.train)
    assert all(math.isfinite(v[-2]) and math.isfinite(v[-1]) for v in learn.recorder.values)


def test_nan_in_adversarial_loss_stops_training(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], paper=True)
    with torch.no_grad(): learn.model.adversaries[1].discriminator[0].weight[0, 0, 0, 0] = float('nan')
    before = {k: v.detach().clone() for k, v in learn.model.models.named_parameters()}
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(AdversarialLossError, match='stopped being finite at epoch 0, batch 0'): learn.fit(1, 0.02)
    for k, v in learn.model.models.named_parameters(): torch.testing.assert_close(v, before[k]) # no weight updated


@pytest.mark.parametrize('paper', [False, True])
def test_non_finite_adversarial_gradients_stop_training(small_digits, paper):
    "Finite adversarial losses, one infinite gradient (fp32: no scaler to skip the step): stopped there, named, nothing updated"
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], paper=paper)
    cb, grads_of = learn.adversarial_feature, learn.adversarial_feature.grads_of
    def poisoned(loss, params): # at batch 1, the first gradient of the discriminators' loss gets an infinite entry
        grads = list(grads_of(loss, params))
        if cb.iter == 1 and params is cb.disc: grads[0] = grads[0].flatten().index_fill(0, torch.tensor([0]), float('inf')).view_as(grads[0])
        return tuple(grads)
    cb.grads_of = poisoned
    kept = {}
    class Keep(Callback):
        def before_batch(self): kept.update({k: v.detach().clone() for k, v in self.learn.model.named_parameters()})
    with learn.no_bar(), learn.no_logging():
        with pytest.raises(AdversarialLossError, match='adversarial gradients stopped being finite at epoch 0, batch 1'):
            learn.fit(1, 0.02, cbs=Keep())
    for k, v in learn.model.named_parameters(): torch.testing.assert_close(v, kept[k]) # batch 1 updated no weight

def test_fp16_loss_scaling_of_the_adversarial_gradients(small_digits):
    "The second optimiser's own GradScaler, forced on (on CPU fastai's autocast is off): same step, overflow skipped"
    dls = digits_dls(size=16, n_per_class=3, bs=30)
    dls.train.shuffle = False # the same order of the batch's images, so that the two steps sum in the same order
    a = afd_learner(dls, ['resnet20', 'resnet20'], adv_lr=1e-3, paper=True)
    b = afd_learner(dls, ['resnet20', 'resnet20'], adv_lr=1e-3, paper=True)
    b.model.load_state_dict(a.model.state_dict())
    b.adversarial_feature.loss_scale = 2.**10
    for l in (a, b): l.fit(1, 0.05, cbs=OneStep())
    for k, v in b.model.state_dict().items(): torch.testing.assert_close(v, a.model.state_dict()[k], rtol=1e-4, atol=1e-5)
    assert b.adversarial_feature.second_scaler.get_scale() == 2.**10 and b.adversarial_feature.skipped_steps == 0
    c = afd_learner(dls, ['resnet20', 'resnet20'], adv_lr=1e-3, paper=True)
    c.adversarial_feature.loss_scale = float('inf') # the scaled adversarial gradients overflow
    bodies = deepcopy([m.body.state_dict() for m in c.model.models])
    discs = deepcopy(c.model.adversaries.state_dict())
    c.fit(1, 0., cbs=OneStep()) # first optimiser at lr 0: only an adversarial step could move the bodies
    assert c.adversarial_feature.skipped_steps == 1
    for m, s in zip(c.model.models, bodies):
        for k, v in m.body.state_dict().items():
            if v.is_floating_point() and 'running' not in k: torch.testing.assert_close(v, s[k])
    for k, v in c.model.adversaries.state_dict().items():
        if v.is_floating_point() and 'running' not in k: torch.testing.assert_close(v, discs[k])


def test_export_load_learner_and_peer(small_digits, tmp_path):
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], path=tmp_path, paper=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    items = small_digits.valid_ds.items[:8]
    preds = learn.get_preds(dl=small_digits.test_dl(items), per_network=True)[0]
    learn.export('afd.pkl')
    assert learn.adversarial_feature.adv_opt is not None # export leaves the live learner intact
    loaded = load_learner(tmp_path/'afd.pkl')
    assert loaded.adversarial_feature.adv_opt is None and len(loaded.model.adversaries) == 2
    for a, b in zip(loaded.get_preds(dl=loaded.dls.test_dl(items), per_network=True)[0], preds): torch.testing.assert_close(a, b)
    one = learn.peer(0)
    torch.testing.assert_close(one.get_preds(dl=small_digits.test_dl(items))[0], preds[0])


def test_mutual_topology_for_three_networks(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20', 'resnet20'], topology='mutual')
    assert len(learn.model.adversaries) == 6
    assert [type(cb).__name__ for cb in learn.cbs][-3:] == ['DistillCallback', 'AdversarialFeatureCallback', 'StopOnNonFinite']
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    assert math.isfinite(learn.recorder.values[-1][-1])
