"""Precision paths on the accelerator: every registered method under fastai's `to_fp16` and `to_bf16`, AFD's second
optimiser with its own GradScaler, AD's adversaries, and a skipped fp16 step on overflow.

fastai autocasts on CUDA only, so these run where `AFD_DEVICE` names a device: `benchmarks/gpu_check.sh` sets it to
`cuda` on a GPU, and to `cpu` in its dry run (which checks that the checks themselves run: on the CPU the assertions
that need autocast are left out). The CPU's own bf16 autocast paths are `test_training.py`'s."""
import os, pytest, torch
from fastai.callback.core import Callback
import fastai.callback.fp16 # to_fp16, to_bf16
from afd_fastai.all import *
from afd_fastai.fairness.data import digits_s_dls

device = os.environ.get('AFD_DEVICE')
assert device, "the accelerator checks: run by benchmarks/gpu_check.sh (AFD_DEVICE=cuda on a GPU; AFD_DEVICE=cpu in its dry run)"
on_gpu = bool(device) and device.startswith('cuda')

class MapDtypes(Callback):
    "The dtypes of the feature maps and logits of every training forward"
    order = 11 # after MixedPrecision's before_batch, so inside its autocast
    def before_fit(self): self.maps,self.logits = set(),set()
    def after_pred(self):
        if not self.training: return
        self.maps |= {f.dtype for f in getattr(self.learn.model, 'feature_maps', []) if f is not None}
        self.logits |= {p.dtype for p in self.pred}

def learner(method, **kwargs):
    declared = distill_methods[method]
    dls = (digits_s_dls(bs=32, seed=0, n_per_class=10, device=device) if declared.groups
           else digits_dls(size=16, n_per_class=10, bs=32, seed=0, device=device))
    net = (lambda: cifar10s_net(n_out=10, size=16)) if declared.groups else (lambda: resnet20(n_out=10))
    nets = [net()] if declared.offline else [net(), net()]
    if declared.offline: kwargs['teacher'] = net()
    return afd_learner(dls, nets, method=method, **kwargs)

methods = os.environ.get('AFD_GPU_METHODS', ','.join(distill_methods)).split(',') # the dry run: a few

@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
@pytest.mark.parametrize('method', methods)
def test_every_method_trains_in_mixed_precision(method, precision):
    if method == 'dml_alternating': pytest.skip("dml_alternating refuses mixed precision with a clear error (tests/test_methods.py)")
    # fastai's GradScaler starts at 2**16 and skips every step that overflows while it halves the scale: MFD's gradients
    # (up to ~40 here) overflowed all three steps of this fit on a GPU, so under fp16 the search starts at 2**10
    learn = learner(method).to_fp16(init_scale=2.**10) if precision == 'fp16' else learner(method).to_bf16()
    watch = MapDtypes()
    before = [p.detach().clone() for p in learn.model.parameters()]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02, cbs=watch)
    after = list(learn.model.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in after) # fp32 master weights
    assert any(not torch.equal(a, b) for a, b in zip(after, before)) # something trained
    assert all(torch.isfinite(torch.tensor(v, dtype=torch.float64)) for v in learn.recorder.values[-1] if v is not None)
    if on_gpu: # fastai's autocast is on: the forward ran in the low precision
        want = torch.float16 if precision == 'fp16' else torch.bfloat16
        assert want in watch.maps | watch.logits, (watch.maps, watch.logits)
        adv = getattr(learn, 'adversarial_feature', None)
        if adv is not None: # AFD's second optimiser scales its own gradients under fp16 only
            assert (adv.second_scaler is not None) == (precision == 'fp16')
        if distill_methods[method].model_modules: assert learn.opt.second is not None # AD's adversaries stepped

@pytest.mark.parametrize('paper', [False, True])
def test_an_overflowing_fp16_adversarial_step_is_skipped(paper):
    learn = learner('afd', paper=paper).to_fp16()
    learn.adversarial_feature.loss_scale = float('inf') # every scaled adversarial gradient overflows
    discs = {k: v.clone() for k, v in learn.model.adversaries.state_dict().items()}
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0.02)
    assert learn.adversarial_feature.skipped_steps == len(learn.dls.train)
    for k, v in learn.model.adversaries.state_dict().items():
        if v.is_floating_point() and 'running' not in k: torch.testing.assert_close(v, discs[k])
