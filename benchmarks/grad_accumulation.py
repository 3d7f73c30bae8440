"""How far fastai's `GradientAccumulation` moves a peer learner from the same math done by hand.

Two micro-batches of 16 digits with `GradientAccumulation(n_acc=32)`, against a plain-PyTorch loop that accumulates
the same two micro-batches (each loss divided by 2, both optimisers stepped once), from the same initial weights
(small BatchNorm-free networks, and ResNet-20s). Prints, per method, the largest parameter difference and the size of the update (the
largest parameter change): a correct implementation has a difference at rounding level, far below the update.

    python benchmarks/grad_accumulation.py
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parents[1]/'tests'))
from test_fidelity import accumulated_and_plain # the run and the plain loop the tests compare

if __name__ == '__main__':
    print('| method | networks | max parameter difference | update size |\n|---|---|---|---|')
    for method, widths in [('dml', (8, 16)), ('afd', (8, 16)), ('afd', (8, 16, 8)), ('afd', ('resnet20',) * 3)]:
        got, want, before = accumulated_and_plain(method, widths)
        diff = max((got[k] - want[k]).abs().max().item() for k in got if got[k].is_floating_point())
        update = max((got[k] - before[k]).abs().max().item() for k in got if got[k].is_floating_point())
        nets = ' + '.join(f'convnet{w}' if isinstance(w, int) else w for w in widths)
        print(f"| {method} | {nets}{' (cyclic)' if len(widths) > 2 else ''} | {diff:.2e} | {update:.2e} |")
