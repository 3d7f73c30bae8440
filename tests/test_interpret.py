"Pictures in the runtime environment (newest fastai): Grad-CAM against the class activation map, the peer-metric plot"
import torch, torch.nn.functional as F
from fastcore.test import test_eq as equal, test_close as close, test_fail as fails
from afd_fastai.learner import afd_learner
from afd_fastai.interpret import gradcam_maps, show_gradcam, peer_history

def test_gradcam_is_the_class_activation_map(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'wrn16_2'], method='dml')
    xb, yb = small_digits.valid.one_batch()
    maps = gradcam_maps(learn, xb[:6], target=yb[:6])
    equal(maps.shape, (2, 6, 16, 16))
    with torch.no_grad():
        for k, net in enumerate(learn.model.eval().models):
            cam = F.relu(torch.einsum('bc,bchw->bhw', net[1][-1].weight[yb[:6].as_subclass(torch.Tensor)], net[0](xb[:6])))
            cam = F.interpolate(cam[:, None], size=(16, 16), mode='bilinear', align_corners=False)[:, 0]
            close(maps[k], cam / cam.amax((1, 2), keepdim=True).clamp_min(1e-12), eps=1e-5)
    assert (maps.amax((2, 3)) == 1).float().mean() > 0.5 # most maps are not empty: the comparison has content

def test_peer_metrics_plot_and_gradcam_grid(small_digits):
    learn = afd_learner(small_digits, ['resnet20', 'resnet20'], method='afd')
    learn.fit_one_cycle(1, 0.05)
    hist = peer_history(learn.recorder)
    equal(list(hist.columns), ['acc_resnet20_1', 'acc_resnet20_2', 'acc_avg', 'acc_ens'])
    axs = learn.recorder.plot_peer_metrics()
    equal(len(axs), 2)
    close(axs[0].get_lines()[-1].get_ydata(), 100 * hist.acc_ens.values)
    grid = show_gradcam(learn, [0, 2, 4])
    equal(grid.shape, (3, 3))
    fails(lambda: show_gradcam(learn, [10_000]), contains='items must be indices')
