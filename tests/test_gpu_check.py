"The GPU check script, run as its dry run on the CPU: every step runs and reports, so the script cannot rot between loans"
import os, subprocess, sys
from pathlib import Path

def test_gpu_check_dry_run(tmp_path):
    root = Path(__file__).parents[1]
    env = {**os.environ, 'PYTHON': sys.executable, 'PYTHONPATH': f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    res = subprocess.run(['bash', 'benchmarks/gpu_check.sh', str(tmp_path), '--dry-run'], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    summary = (tmp_path/'summary.md').read_text()
    assert res.returncode == 0, res.stdout + res.stderr + summary
    rows = {line.split('|')[1].strip(): line.split('|')[2].strip() for line in summary.splitlines() if line.startswith('| ') and '---' not in line}
    assert [k for k, v in rows.items() if v == 'ok'] == ['environment', 'precision_tests', 'bench_fp32', 'bench_fp32_paper',
                                                         'channels_last', 'epoch'], rows
    assert rows['two_gpus'].startswith('skipped') and '0 step(s) failed' in summary
    assert '| afd |' in summary and 's/epoch' in summary # the benchmark's and the epoch's tables are in the summary
