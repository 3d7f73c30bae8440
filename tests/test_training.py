"Training on real data (digits) through the fastai Learner API"
import math, warnings
import pytest, torch
from fastai.learner import load_learner
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.fp16 import MixedPrecision
from afd_fastai.all import *

@pytest.mark.parametrize('method', ['vanilla', 'dml', 'afd'])
def test_every_network_learns(small_digits, method):
    "With the library's defaults; AFD's discriminators do not win outright (no divergence warning)"
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], method=method)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('error', AdversarialDivergenceWarning)
        learn.fit_one_cycle(4, 0.05)
    names = [m.name for m in learn.metrics]
    final = dict(zip(names, learn.recorder.values[-1][2:]))
    for name in ['acc_resnet20', 'acc_wrn16_2', 'acc_avg', 'acc_ens']:
        assert final[name] > 0.6, (name, final) # chance is 0.1

def test_validation_loss_is_plain_cross_entropy(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], method='dml', loss_parts=True)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    valid_loss, *mets = learn.validate()
    names = [m.name for m in learn.metrics]
    parts = dict(zip(names, mets))
    assert 'ce_resnet20_1' in parts and 'ce_resnet20_2' in parts
    assert valid_loss == pytest.approx(parts['ce_resnet20_1'] + parts['ce_resnet20_2'], rel=1e-4)
    # computed by hand over the validation set: the sum of the two networks' cross-entropies, no KL
    (p1, p2), targs = learn.get_preds(per_network=True)
    ce = sum(torch.nn.functional.nll_loss(p.log(), targs.long()) for p in (p1, p2))
    assert valid_loss == pytest.approx(ce.item(), rel=1e-3)

def test_training_loss_includes_distillation(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], method='dml', paper=True)
    class Grab(Callback):
        order = 50
        def after_loss(self): self.loss, self.ce = self.learn.loss.item(), sum(getattr(self.loss_func, n).item() for n in self.loss_func.part_names)
        def after_step(self): raise CancelFitException()
    grab = Grab()
    learn.fit(1, 0.01, cbs=grab)
    assert grab.loss == pytest.approx(grab.ce + learn.distill_loss.item(), rel=1e-5)
    assert learn.distill_loss.item() > 0

def test_get_preds_show_results_and_lr_find(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], method='dml')
    (p1, p2), targs, decoded = learn.get_preds(with_decoded=True, per_network=True)
    n = len(small_digits.valid_ds)
    assert p1.shape == p2.shape == (n, 10)
    torch.testing.assert_close(p1.sum(1), torch.ones(n))
    torch.testing.assert_close(decoded, ((p1 + p2) / 2).argmax(1))
    learn.show_results(max_n=4)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with learn.no_bar(): suggestion = learn.lr_find(num_it=10, show_plot=False)
    assert suggestion.valley > 0
    for k, v in learn.model.state_dict().items(): torch.testing.assert_close(v, before[k])

def test_save_load_round_trip(small_digits, tmp_path):
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], method='dml', path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    learn.save('pair')
    preds = learn.get_preds(per_network=True)[0]
    other = afd_learner(small_digits, ['resnet20', 'wrn16_2'], method='dml', path=tmp_path)
    assert not torch.allclose(other.get_preds(per_network=True)[0][0], preds[0])
    other.load('pair')
    for a, b in zip(other.get_preds(per_network=True)[0], preds): torch.testing.assert_close(a, b)
    torch.testing.assert_close(other.opt.state_dict()['state'], learn.opt.state_dict()['state']) # momentum buffers too

def test_export_and_peer_export(small_digits, tmp_path):
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], method='dml', path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    items = small_digits.valid_ds.items[:8]
    preds = learn.get_preds(dl=small_digits.test_dl(items), per_network=True)[0]
    learn.export('pair.pkl')
    loaded = load_learner(tmp_path/'pair.pkl')
    for a, b in zip(loaded.get_preds(dl=loaded.dls.test_dl(items), per_network=True)[0], preds): torch.testing.assert_close(a, b)
    one = learn.peer(1)
    one.export('wrn.pkl')
    single = load_learner(tmp_path/'wrn.pkl')
    torch.testing.assert_close(single.get_preds(dl=single.dls.test_dl(items))[0], preds[1])
    pred_class, _, probs = single.predict(items[0])
    torch.testing.assert_close(probs, preds[1][0])

@pytest.mark.parametrize('method', ['dml', 'afd'])
@pytest.mark.parametrize('precision', ['to_fp16', 'to_bf16'])
def test_mixed_precision_runs(small_digits, precision, method):
    "On CPU fastai's autocast is a no-op: this checks the callbacks compose; the GPU check is a benchmark"
    learn = getattr(afd_learner(small_digits, ['resnet20', 'resnet20'], method=method), precision)()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    assert all(torch.isfinite(torch.tensor(v)) for v in learn.recorder.values[-1])

@pytest.mark.parametrize('method', ['dml', 'afd'])
def test_three_networks_and_torchvision(small_digits, method):
    import torchvision
    learn = afd_learner(small_digits, ['resnet20', torchvision.models.resnet18, wrn16_2], method=method, paper=True) # cyclic AFD
    assert learn.model.feature_layers == ['body', 'layer4', 'body']
    assert [m.name for m in learn.metrics][:3] == ['acc_resnet20', 'acc_resnet', 'acc_wrn16_2']
    if method == 'afd': # resnet18's 512×1×1 map (16-pixel inputs) against the others' 4×4 maps: pooled to 1×1
        assert [a.size for a in learn.model.adversaries] == [(4, 4), (1, 1), (1, 1)] # edges 2→0, 0→1, 1→2
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    assert len(learn.recorder.values[-1]) == 2 + 5 + 1 + (2 if method == 'afd' else 0) # losses, accuracies, terms
    assert all(math.isfinite(v) for v in learn.recorder.values[-1])

def test_cifar_folder_trains(tmp_path):
    write_fake_cifar(tmp_path, 10, n_train=40, n_test=20)
    dls = cifar_dls(tmp_path, 10, bs=8)
    learn = afd_learner(dls, ['resnet20', 'resnet20'], method='dml')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.01)
    assert learn.dls.vocab[0] == 'class0'

class LossParts(Callback):
    "Each training batch's (pct_train, loss, sum of cross-entropies, distill_loss, g_loss or None)"
    order = 50
    def before_fit(self): self.rows = []
    def after_loss(self):
        if not self.training: return
        ce = sum(getattr(self.loss_func, n).item() for n in self.loss_func.part_names)
        g = self.learn.recorder.g_losses[-1] if len(getattr(self.learn.recorder, 'g_losses', [])) else None
        self.rows.append((self.pct_train, self.learn.loss.item(), ce, self.learn.distill_loss.item(), g))

def test_distill_warmup_ramps_the_term_in(small_digits):
    "distill_warmup=0.5: the term counts 0 at the first batch and fully after half the fit"
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], method='dml', distill_warmup=0.5)
    grab = LossParts()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 0.01, cbs=grab)
    for pct, loss, ce, kd, _ in grab.rows:
        assert loss == pytest.approx(ce + min(1., pct / 0.5) * kd, rel=1e-5)
    assert grab.rows[0][1] == pytest.approx(grab.rows[0][2], rel=1e-6) and grab.rows[0][3] > 0 # first batch: CE alone

def test_afd_default_adds_the_ramped_generator_loss(small_digits):
    "The library's AFD: loss = CE + ramp·T²KL + ramp·λ·g_loss, the ramp linear over the first 30 % of training"
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], adv_weight=2.)
    grab = LossParts()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 0.01, cbs=grab)
    for pct, loss, ce, kd, g in grab.rows:
        assert loss == pytest.approx(ce + min(1., pct / 0.3) * (kd + 2. * g), rel=1e-5)
    assert grab.rows[-1][4] > 0 and grab.rows[-1][0] > 0.3 # the last batches: the full weights, a non-zero g_loss

class CPUAutocast(Callback):
    "What fastai's MixedPrecision does on a GPU, on the CPU: forward and losses under autocast, predictions back in fp32"
    order = 10
    def __init__(self, dtype): self.dtype = dtype
    def before_fit(self): self.map_dtypes = set()
    def before_batch(self): self.ctx = torch.autocast('cpu', dtype=self.dtype); self.ctx.__enter__()
    def after_pred(self):
        self.map_dtypes |= {f.dtype for f in self.learn.model.feature_maps if f is not None}
        self.learn.pred = tuple(p.float() for p in self.pred)
    def after_loss(self): self.ctx.__exit__(None, None, None)

@pytest.mark.parametrize('method,paper', [('afd', False), ('afd', True), ('dml', False), ('l1_kd', False)])
def test_bf16_autocast_paths_on_cpu(small_digits, method, paper):
    "The half-precision paths of the losses and the discriminators, exercised on the CPU: bf16 feature maps, fp32 losses, learning"
    nets = [cifar_resnet(8, n_out=10), cifar_resnet(8, n_out=10)] # one block a stage: CPU bf16 convolutions are slow
    learn = afd_learner(small_digits, nets, method=method, paper=paper, cbs=CPUAutocast(torch.bfloat16))
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 0.05)
    assert learn.cpu_autocast.map_dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    first, last = learn.recorder.values[0], learn.recorder.values[-1]
    assert all(math.isfinite(v) for v in last)
    assert last[0] < first[0] # the training loss falls
    if method == 'afd': assert all(math.isfinite(v) for v in learn.recorder.d_losses + learn.recorder.g_losses)

@pytest.mark.parametrize('method', list(distill_methods))
def test_every_method_steps_under_cpu_bf16_autocast(method):
    "Every registered method with its forward and losses in bf16 (CPUAutocast, as MixedPrecision on a GPU): bf16 maps, finite fp32 weights that moved"
    from afd_fastai.fairness.data import digits_s_dls
    declared = distill_methods[method]
    dls = digits_s_dls(bs=32, seed=0, n_per_class=10) if declared.groups else digits_dls(size=16, n_per_class=10, bs=32, seed=0)
    net = (lambda: cifar10s_net(n_out=10, size=16)) if declared.groups else (lambda: resnet20(n_out=10))
    kwargs = dict(teacher=net()) if declared.offline else {}
    learn = afd_learner(dls, [net()] if declared.offline else [net(), net()], method=method, cbs=CPUAutocast(torch.bfloat16), **kwargs)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    assert torch.bfloat16 in learn.cpu_autocast.map_dtypes
    after = list(learn.model.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after)
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) > 1e-3 # trained
    assert all(math.isfinite(v) for v in learn.recorder.values[-1] if v is not None), learn.recorder.values[-1]

class CPUMixedPrecision(MixedPrecision):
    "fastai's fp16 `MixedPrecision` with its autocast and GradScaler on the CPU (fastai's own are CUDA-only)"
    def before_fit(self):
        with warnings.catch_warnings(): warnings.simplefilter('ignore'); super().before_fit() # its CUDA scaler, disabled here
        self.autocast,self.learn.scaler = torch.autocast('cpu', dtype=torch.float16),torch.amp.GradScaler('cpu', **self.kwargs)
    def after_fit(self): self.final_scale,self.taken = self.learn.scaler.get_scale(),len(self.scales); super().after_fit()

@pytest.mark.parametrize('init_scale', [2.**16, 2.**10])
def test_mfd_steps_skipped_at_fastais_first_fp16_scale(init_scale):
    "Why tests/gpu_precision.py starts fp16 at 2**10: at fastai's 2**16 MFD's gradients overflow all three steps of its fit (as on the GPU)"
    from afd_fastai.fairness.data import digits_s_dls
    net = lambda: cifar10s_net(n_out=10, size=16)
    mp = CPUMixedPrecision(init_scale=init_scale)
    learn = afd_learner(digits_s_dls(bs=32, seed=0, n_per_class=10), [net()], method='mfd', teacher=net(), cbs=mp)
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    moved = any(not torch.equal(a, b) for a, b in zip(learn.model.parameters(), before))
    if init_scale == 2.**16: assert (moved, mp.final_scale, mp.taken) == (False, 2.**13, 0) # 3 steps, each overflowed and halved
    else: assert (moved, mp.final_scale, mp.taken) == (True, 2.**10, 3) # every step taken

def test_validate_every_beside_stock_callbacks(tmp_path):
    "ValidateEvery with GradientAccumulation, GradientClip and SaveModelCallback: the same weights as validating every epoch; a watcher of validation refused"
    from fastai.callback.training import GradientAccumulation, GradientClip
    from fastai.callback.tracker import SaveModelCallback, EarlyStoppingCallback
    from afd_fastai.tools.experiment import ValidateEvery
    from fastai.torch_core import set_seed
    def run(every): # networks with dropout: training draws from torch's generator, as starting a loader does
        set_seed(0, reproducible=True)
        dls = digits_dls(size=16, n_per_class=10, bs=16, seed=0)
        nets = [cifar10s_net(n_out=10, size=16), cifar10s_net(n_out=10, size=16)]
        learn = afd_learner(dls, nets, method='afd', path=tmp_path/str(every))
        cbs = [GradientAccumulation(32), GradientClip(1.), SaveModelCallback(fname='ck', every_epoch=True, with_opt=True)]
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 0.05, cbs=cbs + [ValidateEvery(every)])
        return learn
    every, each = run(3), run(1)
    assert [v[1] is not None for v in every.recorder.values] == [False, False, True, True]
    for (k, a), b in zip(every.model.state_dict().items(), each.model.state_dict().values()): assert torch.equal(a, b), k
    assert sorted(f.name for f in (tmp_path/'3'/'models').iterdir()) == [f'ck_{i}.pth' for i in range(4)]
    for watcher in (SaveModelCallback(monitor='valid_loss'), EarlyStoppingCallback(monitor='acc_avg')):
        with pytest.raises(ValueError, match=r"ValidateEvery\(3\) leaves epochs without validation, but .* watches"):
            every.fit(1, 0.01, cbs=[watcher, ValidateEvery(3)])
    every.fit(1, 0.01, cbs=[SaveModelCallback(monitor='train_loss', fname='best'), ValidateEvery(3)]) # the training loss is always there

@pytest.mark.parametrize('method', list(distill_methods))
def test_a_non_finite_loss_stops_every_method_with_the_last_checkpoint_intact(method, tmp_path):
    "NaN enters at epoch 1, batch 1: the fit stops there with the batch named, the weights finite, epoch 0's checkpoint whole"
    from copy import deepcopy
    from afd_fastai.fairness.data import digits_s_dls
    declared = distill_methods[method]
    dls = digits_s_dls(bs=32, seed=0, n_per_class=10) if declared.groups else digits_dls(size=16, n_per_class=10, bs=32, seed=0)
    net = (lambda: cifar10s_net(n_out=10, size=16)) if declared.groups else (lambda: resnet20(n_out=10))
    kwargs = dict(teacher=net()) if declared.offline else {}
    learn = afd_learner(dls, [net()] if declared.offline else [net(), net()], method=method, path=tmp_path, **kwargs)
    class Poison(Callback):
        def before_batch(self):
            if self.epoch == 1 and self.iter == 1: self.learn.xb = (self.xb[0] * float('nan'),)
    class KeepEpochEnd(Callback):
        order = 70
        def after_epoch(self): self.state = deepcopy(self.learn.model.state_dict())
    keep = KeepEpochEnd()
    with pytest.raises((NonFiniteError, AdversarialLossError), match='at epoch 1, batch 1') as err:
        with learn.no_bar(), learn.no_logging(): learn.fit(3, 0.02, cbs=[CheckpointCallback('run'), Poison(), keep])
    assert 'stopped before this batch updated anything' in str(err.value)
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    restored = afd_learner(dls, [net()] if declared.offline else [net(), net()], method=method, path=tmp_path, **kwargs).load('run')
    for k, v in restored.model.state_dict().items(): assert torch.equal(v, keep.state[k]), k
