"""A fastai user's own pipeline: a folder of real images (Fashion-MNIST, written as PNGs), one channel, `aug_transforms`,
zoo, torchvision and timm peers given by name; every Learner call answers as on a plain fastai `Learner`."""
import io, warnings
import numpy as np, pytest, torch, timm
import matplotlib.pyplot as plt
from torch import nn
from PIL import Image
from fastai.data.block import DataBlock, CategoryBlock
from fastai.data.transforms import get_image_files, GrandparentSplitter, parent_label
from fastai.vision.data import ImageBlock
from fastai.vision.core import PILImageBW
from fastai.vision.augment import Resize, aug_transforms
from fastai.metrics import accuracy
from fastai.interpret import ClassificationInterpretation
from fastai.callback.tracker import SaveModelCallback
from fastai.callback.training import GradientClip
from fastai.torch_core import set_seed
import fastai.vision.learner # plot_top_losses for images, as `from fastai.vision.all import *` brings it
from afd_fastai.data import load_fashion_mnist, balanced_subset, fashion_mnist_dls
from afd_fastai.learner import afd_learner
from afd_fastai.tools.experiment import ValidateEvery

@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    "8 training and 4 validation images per class of the real Fashion-MNIST, as PNG files in class folders"
    x_train, y_train, _, _, classes = load_fashion_mnist()
    path = tmp_path_factory.mktemp('fashion_png')
    idx = balanced_subset(y_train, 12, seed=0)
    for n, i in enumerate(idx):
        split = 'valid' if n % 3 == 0 else 'train'
        out = path/split/classes[y_train[i]].replace('/', '_')
        out.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x_train[i, 0].numpy()).save(out/f'{i}.png')
    return path

@pytest.fixture(scope='module')
def dls(folder):
    block = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                      splitter=GrandparentSplitter(train_name='train', valid_name='valid'), get_y=parent_label,
                      item_tfms=Resize(32), batch_tfms=aug_transforms(size=32, min_scale=0.9))
    return block.dataloaders(folder, bs=16, num_workers=0)

def quiet_fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kwargs)

def test_one_channel_peers_by_name(dls):
    "Zoo, torchvision and timm names build for the data's one channel and ten classes, and train beside fastai's callbacks"
    assert dls.one_batch()[0].shape[1] == 1
    learn = afd_learner(dls, ['resnet20', 'resnet18', 'convnext_atto'], method='dml')
    firsts = [next(m for m in net.modules() if isinstance(m, nn.Conv2d)) for net in learn.model.models]
    assert [c.in_channels for c in firsts] == [1, 1, 1] and learn.model.n_outputs == [10, 10, 10]
    assert learn.names == ['resnet20', 'resnet18', 'convnext_atto']
    assert learn.model.feature_shapes[2] == (320, 1, 1) # timm's ConvNeXt: its last stage's map, before the head's pooling and norm
    quiet_fit(learn, 1, 0.01, cbs=[GradientClip(1.), SaveModelCallback(monitor='acc_ens')])
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())

def test_get_preds_is_the_ensembles(dls, folder):
    learn = afd_learner(dls, ['resnet20', 'wrn16_2'], method='afd')
    quiet_fit(learn, 1, 0.05)
    probs, targs = learn.get_preds()
    assert probs.shape == (len(dls.valid_ds), 10)
    column = learn.validate()[1 + [m.name for m in learn.metrics].index('acc_ens')]
    assert float(accuracy(probs, targs)) == pytest.approx(column, abs=1e-6) # accuracy(*learn.get_preds()) is acc_ens
    (p0, p1), _ = learn.get_preds(per_network=True)
    torch.testing.assert_close(probs, (p0 + p1) / 2)
    torch.testing.assert_close(learn.peer(1).get_preds()[0], p1) # one network, as a plain Learner
    inp, _, _, decoded, losses = learn.get_preds(with_input=True, with_decoded=True, with_loss=True)
    assert inp.shape[:2] == (len(dls.valid_ds), 1) and torch.equal(decoded, probs.argmax(1))
    torch.testing.assert_close(losses, -probs[torch.arange(len(targs)), targs].log(), atol=1e-5, rtol=1e-5)
    files = get_image_files(folder/'valid')[:5]
    test_probs = learn.get_preds(dl=dls.test_dl(files))[0]
    assert test_probs.shape == (5, 10)
    label, idx, one = learn.predict(files[0])
    torch.testing.assert_close(one, test_probs[0]); assert str(label) == dls.vocab[idx]
    tta, tta_targs = learn.tta(n=2)
    assert tta.shape == probs.shape and torch.equal(tta_targs, targs)

def test_interpretation_draws_k_images_with_the_ensembles_loss(dls):
    learn = afd_learner(dls, ['resnet20', 'wrn16_2'], method='dml')
    quiet_fit(learn, 1, 0.05)
    probs, targs = learn.get_preds()
    interp = ClassificationInterpretation.from_learner(learn)
    by_hand = -probs[torch.arange(len(targs)), targs].log()
    torch.testing.assert_close(interp.losses, by_hand, atol=1e-5, rtol=1e-5)
    assert interp.confusion_matrix().trace() == (probs.argmax(1) == targs).sum().item()
    plt.close('all')
    interp.plot_top_losses(9)
    axes = plt.gcf().axes
    assert sum(bool(ax.images) for ax in axes) == 9
    top = by_hand.topk(9).values
    titles = [ax.get_title() for ax in axes if ax.images]
    assert all(f"{v:.2f}" in t for v, t in zip(top.tolist(), titles)) # each image titled with its ensemble loss

def test_token_models_train_with_logit_methods_and_are_refused_for_maps(dls):
    vit = lambda: timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, num_classes=10, in_chans=1)
    learn = afd_learner(dls, [vit(), 'resnet20'], method='dml')
    quiet_fit(learn, 1, 0.01)
    with pytest.raises(ValueError, match="token sequence .*'patch_embed.proj'"): afd_learner(dls, [vit(), 'resnet20'], method='afd')
    learn = afd_learner(dls, [vit(), 'resnet20'], method='afd', feature_layers=['patch_embed.proj', None]) # the documented layer
    assert learn.model.feature_shapes[0] == (192, 4, 4)

def test_peer_export_holds_that_network_alone(tmp_path):
    # fashion_mnist_dls: exporting a from_folder Learner fails upstream with plum-dispatch 2.10 (cannot pickle RLock)
    dls = fashion_mnist_dls(n_per_class=5, holdout_per_class=2, bs=10)
    learn = afd_learner(dls, ['resnet20', 'wrn16_2'], method='afd', path=tmp_path)
    quiet_fit(learn, 1, 0.05)
    learn.peer(0).export('alone.pkl')
    state = io.BytesIO(); torch.save(learn.model.models[0].state_dict(), state)
    exported = (tmp_path/'alone.pkl').stat().st_size
    assert exported < 1.05 * len(state.getvalue()) + 200_000, (exported, len(state.getvalue())) # the network and fastai's Learner around it
    x = dls.one_batch()[0][:4]
    learn.model(x) # the peer model still keeps its maps after the export
    assert learn.model.feature_maps[0] is not None

def test_lr_find_is_the_networks_alone(dls):
    "lr_find on AFD (and DML with its warm-up) gives the curve of the same networks under vanilla: no terms, no adversarial step"
    from afd_fastai.models import resnet20, wrn16_2
    set_seed(0); nets = [resnet20(10, n_in=1), wrn16_2(10, n_in=1)]
    import copy
    curves = {}
    for method in ('vanilla', 'dml', 'afd'):
        learn = afd_learner(dls, copy.deepcopy(nets), method=method)
        dls.train.rng.seed(1) # the same batches
        set_seed(2) # the same augmentation
        with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=12, show_plot=False)
        curves[method] = torch.tensor(learn.recorder.losses)
        assert all(cb.run for cb in learn.cbs) # every callback runs again after lr_find
    torch.testing.assert_close(curves['dml'], curves['vanilla'])
    torch.testing.assert_close(curves['afd'], curves['vanilla'])

@pytest.mark.parametrize('method', ['afd', 'dml'])
def test_no_warning_from_a_fit_lr_find_or_fine_tune(dls, method, recwarn):
    warnings.simplefilter('always')
    learn = afd_learner(dls, ['resnet20', 'wrn16_2'], method=method)
    with learn.no_bar(): learn.lr_find(num_it=5, show_plot=False)
    quiet_fit(learn, 2, 0.05, cbs=ValidateEvery(2))
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 0.01, freeze_epochs=1)
    ours = [w for w in recwarn.list if 'afd_fastai' in w.filename or 'shadowing' in str(w.message) or 'generator is empty' in str(w.message)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]

def test_a_learner_exported_by_the_flat_layout_loads(tmp_path):
    """A learner exported by version 0.0.1, whose pickle names the flat modules (`afd_fastai.adversarial`, ...), loads in a
    fresh process with its classes from the modules' new places and answers as it did (tests/data: two small conv nets
    trained one epoch of AFD on digits, and their logits on two images at export)"""
    import subprocess, sys
    from pathlib import Path
    data = Path(__file__).parent/'data'
    code = f"""
import torch
from fastai.learner import load_learner
learn = load_learner({str(data/'flat_layout_afd.pkl')!r})
modules = {{type(m).__module__ for m in learn.model.modules() if type(m).__module__.startswith('afd_fastai')}}
assert 'afd_fastai.callback.adversarial' in modules and 'afd_fastai.adversarial' not in modules, modules
want = torch.load({str(data/'flat_layout_afd_expected.pt')!r})
learn.model.eval()
with torch.no_grad(): got = learn.model(want['x'])
for g, w in zip(got, want['logits']): assert torch.allclose(g, w, atol=1e-5), (g, w)
print(len(got))
"""
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == '2'
