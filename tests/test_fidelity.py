"""Fidelity: several consecutive steps against plain PyTorch (edges written out here, not read from the library),
fastai's GradientAccumulation and GradientClip against a plain loop that accumulates the same way, the paper's
defaults, both optimisers' schedules, gradient isolation and one forward per batch."""
from copy import deepcopy
import pytest, torch
from torch import nn
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientAccumulation, GradientClip
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import set_seed
from afd_fastai.all import *


def kl(student, teacher, T=3.):
    "T²·KL(σ(teacher/T) ‖ σ(student/T)), teacher detached, averaged over the batch — written out"
    p = F.softmax(teacher.detach() / T, dim=1)
    return T * T * (p * (p.log() - F.log_softmax(student / T, dim=1))).sum(1).mean()


def plain_afd(nets, advs, edges, batches, lr, adv_lr, kd=True, n_acc=1, clip=None, lam=None, betas=(0.9, 0.999),
              decoupled=False, joint=False):
    """AFD in plain PyTorch over `batches`: SGD on CE + T²·KL, Adam on the LSGAN losses, one forward per batch.
    `edges[e] = (teacher, student)` with discriminator `advs[e].discriminator` and transfer layer `advs[e].transfer`.
    Gradients of `n_acc` consecutive batches are summed (each loss divided by `n_acc`) before both optimisers step.
    The paper's algorithm by default; `lam`: the library's default instead, SGD on CE + T²·KL + lam·g_loss and Adam
    (`betas`, AdamW if `decoupled`) on the discriminators and transfer layers only; `joint`: real and fake in one batch."""
    net_params = [p for n in nets for p in n.parameters()]
    gen = (net_params if lam is None else []) + [p for a in advs for p in a.transfer.parameters()]
    disc = [p for a in advs for p in a.discriminator.parameters()]
    sgd = torch.optim.SGD(net_params, lr=lr, momentum=0.9, weight_decay=1e-4)
    adam_class = torch.optim.AdamW if decoupled else torch.optim.Adam
    adam = adam_class(gen + disc, lr=adv_lr, betas=betas, eps=1e-8, weight_decay=0.1) if advs else None
    adv_grads = [None] * len(gen + disc)
    for i, (x, y) in enumerate(batches):
        feats = [n.body(x) for n in nets]
        logits = [n.head(f) for n, f in zip(nets, feats)]
        students = sorted({s for _, s in edges})
        loss = sum(F.cross_entropy(z, y) for z in logits)
        if kd:
            for s in students:
                ts = [t for t, s2 in edges if s2 == s]
                loss = loss + sum(kl(logits[s], logits[t]) for t in ts) / len(ts)
        if advs: # no discriminators: DML's loop
            g_terms, d_loss = {s: [] for s in students}, 0.
            for (t, s), adv in zip(edges, advs):
                if joint: real, fake = adv.discriminator(torch.cat([feats[t].detach(), adv.transfer(feats[s])])).chunk(2)
                else:
                    fake = adv.discriminator(adv.transfer(feats[s]))
                    real = adv.discriminator(feats[t].detach())
                g_terms[s].append(((1 - fake) ** 2).mean())
                d_loss = d_loss + ((1 - real) ** 2).mean() + (fake ** 2).mean()
            g_loss = sum(sum(v) / len(v) for v in g_terms.values())
            grads = list(torch.autograd.grad(g_loss / n_acc, gen, retain_graph=True, allow_unused=True)) if gen else []
            grads += list(torch.autograd.grad(d_loss / n_acc, disc, retain_graph=True, allow_unused=True))
            adv_grads = [b if a is None else a if b is None else a + b for a, b in zip(adv_grads, grads)]
            if lam is not None: loss = loss + lam * g_loss
        (loss / n_acc).backward()
        if (i + 1) % n_acc: continue
        if clip: nn.utils.clip_grad_norm_(net_params, clip)
        sgd.step(); sgd.zero_grad()
        if adam is None: continue
        adam.zero_grad(set_to_none=True)
        for p in disc: p.grad = None # (lam·g_loss reached them through the backward above; they are D's, not G's)
        for p, g in zip(gen + disc, adv_grads): p.grad = g
        adam.step(); adam.zero_grad(set_to_none=True)
        adv_grads = [None] * len(gen + disc)


class Batches(Callback):
    "Keep every training batch; stop after `n` of them"
    order = 90
    def __init__(self, n): self.n, self.seen = n, []
    def before_batch(self):
        if self.training: self.seen.append((self.x.as_subclass(torch.Tensor).clone(), self.y.as_subclass(torch.Tensor).clone()))
    def after_batch(self):
        if self.training and len(self.seen) == self.n: raise CancelFitException()


def assert_same(got, want, before, rtol=1e-4, atol=1e-5):
    "Equal state dicts, and a check that the steps moved the networks (not vacuous); the largest difference and update"
    assert got.keys() == want.keys()
    diff = max((got[k] - want[k]).abs().max().item() for k in got if got[k].is_floating_point())
    update = max((got[k] - before[k]).abs().max().item() for k in got if got[k].is_floating_point())
    for k in got: torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)
    assert update > 1e-3
    return diff, update


class Double(Callback):
    "Feed the batch in float64 (before `Batches` records it); give fastai's Recorder the loss in float32"
    order = 40
    def before_batch(self): self.learn.xb = tuple(x.as_subclass(torch.Tensor).double() for x in self.xb)
    def after_loss(self): self.learn.loss = self.learn.loss.float()


_afd = distill_methods['afd'].values() # the library's defaults
library_default = dict(lam=_afd.adv_weight, betas=_afd.adv_betas, decoupled=_afd.adv_decouple_wd, joint=_afd.disc_joint)

@pytest.mark.parametrize('paper', [True, False]) # the paper's algorithm, and the library's default AFD
@pytest.mark.parametrize('models,edges', [
    (['resnet20', 'wrn16_2'], [(1, 0), (0, 1)]),                          # two networks of different width
    (['resnet20', 'wrn16_2', 'resnet20'], [(2, 0), (0, 1), (1, 2)]),      # three networks, cyclic: k−1 teaches k
])
def test_three_afd_steps_equal_plain_pytorch(models, edges, paper):
    dls = digits_dls(size=16, n_per_class=6, bs=20) # 60 training images: three batches
    learn = afd_learner(dls, models, paper=paper, adv_lr=1e-3, adv_milestones=(), # a constant second lr, as in the plain loop
                        topology='cyclic' if len(models) > 2 else None, # (the library's default for three is mutual)
                        distill_warmup=0) # (the warm-up's ramp is tested in test_training)
    if not paper: assert learn.model.adversaries[0].discriminator[3].kernel_size == (2, 2) # the full head on 4×4 maps
    assert learn.model.adversary_edges == edges
    learn.model.double() # in float64 the two agree to rounding over several steps; in float32, rounding differences of
                         # 1e-7 flip the odd ReLU and are amplified step after step
    nets, advs = deepcopy(list(learn.model.models)), deepcopy(list(learn.model.adversaries))
    before = deepcopy(learn.model.state_dict())
    rec = Batches(3)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0.05, cbs=[Double(), rec])
    assert len(rec.seen) == 3
    plain_afd(nets, advs, edges, rec.seen, lr=0.05, adv_lr=1e-3, **({} if paper else library_default))
    assert_same(learn.model.state_dict(), model_state(nets, advs), before, rtol=1e-9, atol=1e-10)


def bn_free_net(width, n_out=10):
    "A small CNN without BatchNorm, so that a batch of 32 and two accumulated halves compute the same gradients"
    body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
    return BodyHeadNet(body, pool_linear_head(2 * width, n_out), arch=f'convnet{width}')


def two_halves_and_whole(seed=0):
    "The same 32 digits as one batch, and as two micro-batches of 16"
    set_seed(seed)
    dls = digits_dls(size=16, n_per_class=10, bs=32)
    x, y = [t.as_subclass(torch.Tensor) for t in dls.one_batch()]
    whole = DataLoaders(DataLoader(list(zip(x, y)), bs=32), DataLoader(list(zip(x, y)), bs=32))
    halves = DataLoaders(DataLoader(list(zip(x, y)), bs=16), DataLoader(list(zip(x, y)), bs=16))
    for d in (whole, halves): d.c = 10
    return whole, halves, [(x[:16], y[:16]), (x[16:], y[16:])]


def model_state(nets, advs):
    "The state dict a PeerModel holding `nets` and `advs` (as `adversaries`) would have"
    return {**{f'models.{k}.{n}': v for k, net in enumerate(nets) for n, v in net.state_dict().items()},
            **{f'adversaries.{e}.{n}': v for e, a in enumerate(advs) for n, v in a.state_dict().items()}}


def accumulated_and_plain(method, widths, clip=None, paper=True):
    """`GradientAccumulation(32)` over two micro-batches of 16 (and `GradientClip(clip)`), and the plain loop accumulating
    the same way from the same weights: (the learner's state, the plain loop's, the initial one)"""
    _, halves, micro = two_halves_and_whole()
    set_seed(0)
    nets = [bn_free_net(w) if isinstance(w, int) else w for w in widths] # a width, or a zoo name
    learn = afd_learner(halves, nets, method=method, paper=paper,
                        **distill_methods[method].applicable(adv_lr=1e-3, adv_milestones=(), distill_warmup=0))
    nets = deepcopy(list(learn.model.models))
    advs = deepcopy(list(learn.model.adversaries)) if method == 'afd' else []
    edges = {2: [(1, 0), (0, 1)], 3: [(2, 0), (0, 1), (1, 2)]}[len(widths)] # written out: k−1 teaches k
    before = deepcopy(learn.model.state_dict())
    cbs = [GradientAccumulation(n_acc=32)] + ([GradientClip(max_norm=clip)] if clip else [])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0.05, cbs=cbs)
    plain_afd(nets, advs, edges, micro, lr=0.05, adv_lr=1e-3, n_acc=2, clip=clip, **({} if paper else library_default))
    return learn.model.state_dict(), model_state(nets, advs), before


@pytest.mark.parametrize('method,widths,paper', [('dml', (8, 16), True), ('afd', (8, 16), True), ('afd', (8, 16, 8), True),
                                                ('afd', (8, 16), False)])
def test_gradient_accumulation_equals_plain_accumulation(method, widths, paper):
    "GradientAccumulation(32) over two micro-batches of 16: the library and a plain loop accumulating the same way agree"
    assert_same(*accumulated_and_plain(method, widths, paper=paper))


def test_gradient_accumulation_of_afd_equals_one_batch_without_batchnorm():
    "With no BatchNorm in the networks nor the discriminators, two accumulated halves are one batch of 32"
    whole, halves, _ = two_halves_and_whole()
    states = []
    for dls, cbs in ((whole, []), (halves, [GradientAccumulation(n_acc=32)])):
        set_seed(0)
        learn = afd_learner(dls, [bn_free_net(8), bn_free_net(16), bn_free_net(8)], paper=True, adv_lr=1e-3, adv_milestones=())
        for a in learn.model.adversaries: a.discriminator[1] = nn.Identity() # no BatchNorm in the discriminators either
        for a in learn.model.adversaries:
            if isinstance(a.transfer, nn.Sequential): a.transfer[1] = nn.Identity()
        before = deepcopy(learn.model.state_dict())
        with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0.05, cbs=cbs)
        states.append(learn.model.state_dict())
    assert_same(states[1], states[0], before)


def test_gradient_clip_and_accumulation_together():
    got, want, before = accumulated_and_plain('afd', (8, 16), clip=0.05)
    assert_same(got, want, before)
    free, *_ = accumulated_and_plain('afd', (8, 16)) # the clip really bit: without it the networks end elsewhere
    assert not torch.allclose(free['models.0.head.2.weight'], got['models.0.head.2.weight'], atol=1e-4)


def test_the_papers_defaults():
    dls = digits_dls(size=16, n_per_class=3, bs=30)
    learn = afd_learner(dls, ['resnet20', 'resnet20'], paper=True)
    learn.create_opt()
    h = learn.opt.hypers[0]
    assert (learn.lr, learn.wd, h['mom'], learn.opt.main.decouple_wd) == (0.1, 1e-4, 0.9, False) # coupled L2
    assert learn.distill.T == 3. and learn.distill.weight == 1.
    adv = learn.adversarial_feature
    assert (adv.lr, adv.wd, adv.milestones, adv.gamma) == (2e-5, 0.1, (0.25, 0.5), 0.1)
    second = adv.make_opt()
    h = second.hypers[0]
    assert (h['mom'], h['sqr_mom'], h['eps'], h['wd']) == (0.9, 0.999, 1e-8, 0.1)
    assert second.decouple_wd is False # coupled, as torch.optim.Adam(weight_decay=0.1)
    assert adv.gen_weight is None and adv.warmup == 0 and learn.distill.warmup == 0
    assert [len(g) for g in second.param_lists] == [len(list(learn.model.models.parameters())), len(list(learn.model.adversaries.parameters()))]
    d = learn.model.adversaries[0].discriminator
    assert isinstance(d[4], nn.AdaptiveAvgPool2d) and not learn.model.adversaries[0].joint


def test_the_library_defaults():
    "Without paper=True: warm-up 0.3, λ = 0.3 through SGD, AdamW(β1 0.5) at 2e-4 on the discriminators only, full-map joint D"
    dls = digits_dls(size=16, n_per_class=3, bs=30)
    learn = afd_learner(dls, ['resnet20', 'resnet20'])
    learn.create_opt()
    assert learn.distill.T == 3. and learn.distill.weight == 1. and learn.distill.warmup == 0.3
    adv = learn.adversarial_feature
    assert (adv.lr, adv.wd, adv.milestones, adv.gen_weight, adv.warmup) == (2e-4, 0.1, (0.25, 0.5), 0.3, 0.3)
    second = adv.make_opt()
    h = second.hypers[0]
    assert (h['mom'], h['sqr_mom'], h['wd']) == (0.5, 0.999, 0.1)
    assert second.decouple_wd is True # decoupled, as torch.optim.AdamW
    assert [len(g) for g in second.param_lists] == [len(list(learn.model.adversaries.parameters()))] # no network weights
    a = learn.model.adversaries[0]
    assert a.joint and a.discriminator[3].kernel_size == (2, 2) # resnet20's 4×4 map on 16×16 digits, halved once


class EpochLRs(Callback):
    "Both optimisers' learning rates at each epoch's first training batch"
    order = 70 # after ParamScheduler (60) has set the batch's lr
    def before_fit(self): self.lrs = []
    def before_batch(self):
        if self.training and self.iter == 0:
            self.lrs.append((self.learn.opt.hypers[0]['lr'], self.learn.adversarial_feature.adv_opt.hypers[0]['lr']))


def test_both_learning_rates_follow_a_scaled_down_paper_schedule():
    "8 epochs for 300: SGD 0.1 × 0.1 at 50 % and 75 %; Adam 2e-5 × 0.1 at 25 % and 50 %"
    learn = afd_learner(digits_dls(size=16, n_per_class=4, bs=20), ['resnet20', 'resnet20'], paper=True)
    rec = EpochLRs()
    with learn.no_bar(), learn.no_logging(): learn.fit_multistep(8, cbs=rec)
    sgd, adam = zip(*rec.lrs)
    torch.testing.assert_close([float(v) for v in sgd], [0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    torch.testing.assert_close([float(v) for v in adam], [2e-5] * 2 + [2e-6] * 2 + [2e-7] * 4)


def test_gradient_isolation():
    "The discriminators get only d_loss's gradient, the networks and transfer layers only g_loss's, the heads none"
    dls = digits_dls(size=16, n_per_class=3, bs=30)
    learn = afd_learner(dls, ['resnet20', 'wrn16_2'], adv_lr=1e-3, paper=True)
    cb = learn.adversarial_feature
    class Grab(Callback):
        order = 1 # after the adversarial callback's after_loss, before the step
        def after_loss(self):
            model = self.learn.model
            self.d_loss, self.g_loss = adversarial_losses(model.feature_maps, model.adversaries, model.adversary_edges)
            self.grads = dict(zip(map(id, cb.params), cb.grads))
            raise CancelFitException()
    grab = Grab()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0.05, cbs=grab)
    model = learn.model
    disc = [p for a in model.adversaries for p in a.discriminator.parameters()]
    bodies = [p for m in model.models for p in m.body.parameters()] + [p for a in model.adversaries for p in a.transfer.parameters()]
    heads = [p for m in model.models for p in m.head.parameters()]
    from_d = torch.autograd.grad(grab.d_loss, disc, retain_graph=True)
    from_g = torch.autograd.grad(grab.g_loss, bodies, retain_graph=True)
    for p, g in zip(disc, from_d): torch.testing.assert_close(grab.grads[id(p)], g)
    for p, g in zip(bodies, from_g): torch.testing.assert_close(grab.grads[id(p)], g)
    assert all(grab.grads[id(p)] is None for p in heads)
    # and the test can fail: the other loss does reach these parameters
    assert max(g.abs().max() for g in torch.autograd.grad(grab.g_loss, disc, retain_graph=True)) > 0
    assert max(g.abs().max() for g in torch.autograd.grad(grab.d_loss, bodies, retain_graph=True, allow_unused=True) if g is not None) > 0


class CountBN(Callback):
    order = 95
    def before_fit(self): self.counts = []
    def after_batch(self):
        if self.training:
            self.counts.append([next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d)).num_batches_tracked.item()
                                for m in self.learn.model.models])


@pytest.mark.parametrize('method', ['dml', 'afd', 'l1_kd', 'kd'])
def test_one_forward_per_batch(method):
    learn = afd_learner(digits_dls(size=16, n_per_class=6, bs=20), ['resnet20', 'wrn16_2', 'resnet20'], method=method)
    rec = CountBN()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0.05, cbs=rec)
    assert rec.counts == [[i + 1] * 3 for i in range(3)]
