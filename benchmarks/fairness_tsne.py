"""t-SNE of Fashion-MNIST-S students' features, from the checkpoints of an `afd_train --data fashion_mnist_s` run.

The features are what MFD matches between teacher and student: the student's last feature map (the body's output),
flattened. A balanced draw of the test set (`--per-cell` images of each class in each rendering, the same images for
every method) is embedded per method and written one row per image, so that a docs page can plot it without the
checkpoints. With each embedding, a probe of how much the features say about the rendering: the 5-fold accuracy of a
logistic regression predicting gray/colour from them (50 %: nothing; the lower, the fairer the features).

    python benchmarks/fairness_tsne.py <afd_train --out folder> --methods scratch,mfd --seed 0
"""
import json
from pathlib import Path
import numpy as np, pandas as pd, torch
from fastcore.script import call_parse
from sklearn.manifold import TSNE
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from afd_fastai.models import cifar10s_net
from afd_fastai.tools.experiment import make_dls

def test_draw(dls, per_cell:int, seed:int=0):
    "`per_cell` test images of every (class, rendering), drawn with `seed`: normalised inputs, classes, renderings"
    xs, ys, gs = zip(*[(x.cpu(), y.cpu(), g.cpu()) for x, y, g in dls.valid])
    x, y, g = torch.cat(xs), torch.cat(ys), torch.cat(gs)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero((y == c).numpy() & (g == r).numpy()), per_cell, replace=False)
                          for c in range(dls.c) for r in (0, 1)])
    return x[idx].as_subclass(torch.Tensor), y[idx].numpy(), g[idx].numpy()

def saved_student(file, size:int):
    "The student (network 1 of the peer model) of a run's checkpoint, a `cifar10s_net` for `size`-pixel images"
    state = torch.load(file, map_location='cpu', weights_only=False)['model']
    net = cifar10s_net(size=size)
    net.load_state_dict({k[len('models.1.'):]: v for k, v in state.items() if k.startswith('models.1.')})
    return net.eval()

def student_features(file, size:int, x):
    "The student's body output on `x`, flattened"
    with torch.no_grad(): return saved_student(file, size).body(x).flatten(1).numpy()

@call_parse
def main(run:str, # an `afd_train --data fashion_mnist_s --out` folder (its models/ hold the checkpoints)
         methods:str='scratch,mfd', # methods whose students are embedded, comma-separated
         seed:int=0, # the runs' seed
         per_cell:int=100, # test images per class and rendering
         out:str='benchmarks/results/fairness_fashion_mnist_s_tsne.csv'): # the embedding, one row per image and method
    "Embed the students' features with t-SNE and probe them for the rendering"
    options = json.loads((Path(run)/'afd_train.json').read_text())
    data = {k: options[k] for k in ('size', 'n_per_class', 'skew') if options.get(k) is not None}
    dls = make_dls('fashion_mnist_s', bs=options.get('bs'), seed=seed, **data)
    size = data.get('size') or dls.one_batch()[0].shape[-1]
    x, y, g = test_draw(dls, per_cell)
    rows = []
    for method in methods.split(','):
        f = student_features(Path(run)/'models'/f'{method}_seed{seed}.pth', size, x)
        probe = cross_val_score(LogisticRegression(max_iter=2000), f, g, cv=5).mean()
        xy = TSNE(2, perplexity=30, init='pca', random_state=0).fit_transform(f)
        rows.append(pd.DataFrame(dict(method=method, seed=seed, x=xy[:, 0], y=xy[:, 1], cls=y, group=g, group_probe=probe)))
        print(f"{method}: rendering predicted from the features with {100 * probe:.1f} % accuracy (5-fold)", flush=True)
    pd.concat(rows).round(3).to_csv(out, index=False)
