"The afd_train console script and the README's commands"
import re, subprocess, sys
from pathlib import Path
import pandas as pd
import torch
import pytest

root = Path(__file__).parents[1]

def afd_train(*args, cwd):
    return subprocess.run(['afd_train', *args], cwd=cwd, capture_output=True, text=True, timeout=600)

@pytest.mark.parametrize('args,message', [
    (['--models', 'resnet20,foo'], 'unknown model(s) foo'),
    (['--models', 'resnet20'], 'at least two networks'),
    (['--method', 'dmll'], 'unknown method'),
    (['--data', 'cifar100'], 'needs --data-path'),
    (['--data', 'cifar100', '--data-path', 'nowhere'], 'No CIFAR-100 python-format data'),
    (['--data', 'cifar10', '--data_path', 'nowhere'], 'No CIFAR-10 python-format data'),
    (['--epochs', '0'], '--epochs must be at least 1'),
    (['--seed', 'a'], 'comma-separated integers'),
    (['--method', 'afd,kdd'], "unknown method 'kdd'"),
    (['--adv-lr', '0'], '--adv-lr must be positive'),
    (['--valid-every', '0'], '--valid-every must be at least 1'),
    (['--preset', 't3-resnet33-afd'], 'unknown preset'),
    (['--preset', 't3-resnet32-afd', '--models', 'resnet20,resnet20'], 'drop --models/--method'),
    (['--preset', 't3-resnet32-afd'], '--data cifar100 needs --data-path'),
    (['--method', 'one'], 'must be the same network'),
    (['--method', 'dml', '--teacher', 'x.pth'], '--teacher is for the offline methods'),
    (['--method', 'kd_offline', '--models', 'resnet20'], "teacher's network then the student's"),
    (['--data', 'imagenet', '--data-path', '.', '--models', 'resnet18,resnet34'], 'train/ and val/'),
    (['--data', 'fashion_mnist', '--data-path', 'nowhere'], 'Fashion-MNIST was not found in nowhere'),
    (['--data', 'fashion_mnist_s', '--data-path', 'nowhere'], 'Fashion-MNIST was not found in nowhere'),
    (['--data', 'mnist'], "Unknown data set 'mnist': choose digits, fashion_mnist"),
    (['--skew', '0.5'], '--skew: not an option of --data digits (its options: size, n_per_class, label_noise)'),
    (['--data', 'fashion_mnist', '--label-noise', '0.2'], '--label-noise: not an option of --data fashion_mnist'),
])
def test_bad_options_fail_clearly(tmp_path, monkeypatch, capsys, args, message):
    "In-process through the console entry point (the same parser and checks, without a new interpreter per case)"
    from afd_fastai.tools.cli import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit: main(args)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path/'afd_results').exists()

def test_console_script_exits_with_status_2(tmp_path):
    res = afd_train('--models', 'resnet20,foo', cwd=tmp_path)
    assert res.returncode == 2 and 'afd_train: error: unknown model(s) foo' in res.stderr

def test_short_run_writes_tables(tmp_path):
    res = afd_train('--epochs', '1', '--n-per-class', '5', '--seed', '0,1', '--out', 'res', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    for noise in ('shadowing', 'generator is empty', 'afd_fastai/'): assert noise not in res.stderr, res.stderr[-2000:] # no warning of ours
    assert 'None' not in res.stdout # skipped validations show blank columns
    runs = pd.read_csv(tmp_path/'res'/'results.csv')
    assert list(runs['method']) == ['vanilla', 'vanilla', 'dml', 'dml', 'afd', 'afd']
    assert list(runs['seed']) == [0, 1, 0, 1, 0, 1]
    assert {'acc_resnet20', 'acc_wrn16_2', 'acc_avg', 'acc_ens', 'd_loss', 'g_loss'} <= set(runs.columns)
    assert runs['d_loss'].isna().tolist() == [True] * 4 + [False] * 2 # only AFD has discriminators
    assert 'adv_warned_at' in runs and runs.torch.eq(torch.__version__).all() # when AFD's guard warned (empty: never), and under which torch
    md = (tmp_path/'res'/'results.md').read_text()
    assert 'Regime: digits 16×16, 5 training images per class' in md
    assert md in res.stdout
    assert sorted(f.name for f in (tmp_path/'res'/'models').iterdir()) == [
        'afd_seed0.pth', 'afd_seed1.pth', 'dml_seed0.pth', 'dml_seed1.pth', 'vanilla_seed0.pth', 'vanilla_seed1.pth']
    # the same seed gives the same data order and initial weights: a rerun is identical
    again = afd_train('--epochs', '1', '--n_per_class=5', '--method', 'vanilla,afd', '--seed', '0', '--out', 'again', cwd=tmp_path)
    rerun = pd.read_csv(tmp_path/'again'/'results.csv')
    assert rerun.loc[0, 'acc_avg'] == pytest.approx(runs.loc[0, 'acc_avg'])
    assert rerun.loc[1, 'method'] == 'afd' and rerun.loc[1, 'acc_avg'] == pytest.approx(runs.loc[4, 'acc_avg'])
    assert rerun.loc[1, 'd_loss'] == pytest.approx(runs.loc[4, 'd_loss'])

def test_help_lists_the_options(tmp_path):
    res = afd_train('--help', cwd=tmp_path)
    assert res.returncode == 0
    for option in ['--models', '--method', '--data', '--epochs', '--bs', '--lr', '--seed', '--out']: assert option in res.stdout
    assert re.search('--adv[-_]lr', res.stdout)

def test_readme_commands_are_what_ci_runs():
    readme, ci = (root/'README.md').read_text(), (root/'.ci'/'run').read_text()
    blocks = re.findall(r'```sh\n(.*?)\n```', readme, re.S)
    commands = [line for b in blocks for line in b.splitlines()]
    for cmd in ['pip install -e ".[dev,docs]"', 'afd_train', 'afd_docs', 'OMP_NUM_THREADS=1 nbdev_test && OMP_NUM_THREADS=1 pytest -n auto --maxprocesses 4']: assert cmd in commands
    for cmd in commands: assert cmd in ci, cmd


def test_list_presets(tmp_path):
    res = afd_train('--list-presets', cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [l for l in res.stdout.splitlines() if l.startswith('| t')]
    assert len(rows) == 92
    assert '| t3-resnet32-afd | 3 | resnet32 + resnet32 | afd | cifar100 | 300 | avg 74.03, ens 75.64 |' in res.stdout
    assert '| t6-resnet18-resnet34-afd | 6 | resnet18 + resnet34 | afd | imagenet | 90 |' in res.stdout


def test_imagenet_preset_on_an_image_folder(tmp_path):
    from afd_fastai.data import write_fake_image_folder
    write_fake_image_folder(tmp_path/'inet', n_classes=3, n_train=4, n_val=2)
    res = afd_train('--preset', 't6-resnet18-resnet34-afd', '--data-path', 'inet', '--epochs', '1', '--bs', '4',
                    '--size', '32', '--out', 'res', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    row = pd.read_csv(tmp_path/'res'/'results.csv').iloc[0]
    assert (row['paper_acc_resnet18'], row['paper_acc_resnet34'], row['paper_acc_ens']) == (70.43, 74.00, 74.53)
    md = (tmp_path/'res'/'results.md').read_text()
    assert 'Preset t6-resnet18-resnet34-afd' in md and '| acc_resnet18 | 70.43 |' in md
    assert 'ImageNet folders, 32×32 crops; networks resnet18 + resnet34; methods afd; 1 epochs multistep' in md


def test_offline_method_trains_its_teacher_first_and_reuses_it(tmp_path):
    res = afd_train('--method', 'kd_offline', '--models', 'resnet20,resnet20', '--epochs', '2', '--n-per-class', '5',
                    '--seed', '0', '--out', 'a', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    teacher = tmp_path/'a'/'models'/'teacher_resnet20_seed0.pth'
    assert teacher.is_file()
    first = pd.read_csv(tmp_path/'a'/'results.csv').iloc[0]
    res = afd_train('--method', 'l1_kd_offline', '--teacher', str(teacher), '--models', 'wrn16_2', '--epochs', '2',
                    '--n-per-class', '5', '--seed', '0', '--out', 'b', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    second = pd.read_csv(tmp_path/'b'/'results.csv').iloc[0]
    assert second['acc_teacher'] == first['acc_teacher'] # the same frozen teacher on the same validation set
    assert 'acc_wrn16_2' in second and not (tmp_path/'b'/'models'/'teacher_resnet20_seed0.pth').exists()

def test_resume_continues_an_interrupted_run_as_if_uninterrupted(tmp_path):
    "Killed during its second run (the first finished, the second checkpointed), `--resume DIR` ends with the tables of an uninterrupted run"
    import signal, time
    args = ['--method', 'vanilla,afd', '--seed', '0', '--epochs', '6', '--n-per-class', '10', '--size', '8', '--valid-every', '1']
    whole = afd_train(*args, '--out', 'whole', cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    child = subprocess.Popen(['afd_train', *args, '--out', 'cut'], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, runs = tmp_path/'cut'/'models'/'afd_seed0.pth', tmp_path/'cut'/'runs.csv'
    try:
        for _ in range(6000):
            if runs.exists() and ckpt.exists(): break
            time.sleep(0.01)
    finally: child.send_signal(signal.SIGKILL); child.wait()
    assert runs.exists() and not (tmp_path/'cut'/'results.csv').exists(), 'killed too late: the run had finished'
    assert len(pd.read_csv(runs)) == 1 # vanilla finished, afd was interrupted after at least one epoch
    assert afd_train('--resume', 'cut', '--epochs', '3', cwd=tmp_path).returncode == 2 # its own options only
    res = afd_train('--resume', 'cut', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'vanilla, seed 0: finished before, kept' in res.stdout
    a, b = pd.read_csv(tmp_path/'whole'/'results.csv'), pd.read_csv(tmp_path/'cut'/'results.csv')
    cols = [c for c in a.columns if c.startswith(('acc', 'd_loss', 'g_loss'))]
    pd.testing.assert_frame_equal(a[['method', 'seed'] + cols], b[['method', 'seed'] + cols])

def test_fashion_mnist_run(tmp_path):
    "--data fashion_mnist on a small folder of the four IDX files: the regime printed, a row per method"
    import numpy as np
    from afd_fastai.data import write_idx
    rng = np.random.RandomState(0)
    (tmp_path/'fm').mkdir()
    for name, n in (('train', 60), ('t10k', 20)):
        write_idx(tmp_path/'fm'/f'{name}-images-idx3-ubyte.gz', rng.randint(0, 256, (n, 28, 28)))
        write_idx(tmp_path/'fm'/f'{name}-labels-idx1-ubyte.gz', np.arange(n) % 10)
    res = afd_train('--data', 'fashion_mnist', '--data-path', 'fm', '--n-per-class', '4', '--bs', '8', '--epochs', '1',
                    '--method', 'vanilla,dml', '--seed', '0', '--out', 'res', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = pd.read_csv(tmp_path/'res'/'results.csv')
    assert list(runs['method']) == ['vanilla', 'dml'] and runs['acc_avg'].between(0, 1).all()
    assert 'Regime: Fashion-MNIST 32×32, 4 training images per class, pad-crop and flip; the 10,000 test images' in res.stdout

def test_a_resumed_experiment_keeps_every_finished_row(tmp_path, monkeypatch):
    "Resumed with its methods in another order and killed again, runs.csv still holds every run finished before"
    import afd_fastai.tools.experiment as ex
    spec = lambda methods: ex.RunSpec(['resnet20', 'resnet20'], methods, epochs=1, n_per_class=5, size=8)
    ex.run_experiment(spec(['vanilla', 'dml']), out=tmp_path, progress=False)
    runs = pd.read_csv(tmp_path/'runs.csv')
    runs[runs.method == 'vanilla'].to_csv(tmp_path/'runs.csv', index=False) # as if killed before dml's row was written
    real, calls = ex.train_one, []
    def killed_at_the_second_run(*args, **kwargs):
        if calls: raise KeyboardInterrupt('killed')
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(ex, 'train_one', killed_at_the_second_run)
    with pytest.raises(KeyboardInterrupt): ex.run_experiment(spec(['dml', 'afd', 'vanilla']), out=tmp_path, progress=False, resume=True)
    kept = pd.read_csv(tmp_path/'runs.csv')
    assert sorted(kept.method) == ['dml', 'vanilla'], kept.method.tolist() # vanilla, not reached again, is still there
