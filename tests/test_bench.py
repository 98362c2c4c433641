"""bench/: the GPU checks run as a user runs them, on the CPU (--smoke), so that the script cannot rot before
it meets a GPU; what it writes; the profile's categories."""
import argparse
import json
import os
import re
import shlex
import sys

import pytest
import torch

from conftest import REPO, TINY, run_script

import bench.bench_ttt as bench_ttt
from bench.profile_ttt import CATEGORIES, breakdown, category
from engine_test_time import TestTimeTrainer
from models_mae import build_model
from util.errors import UserError

LEASE_CALL_S = 420  # one call of at most 7 minutes


def gpu_checks(out, *args, check=True):
    return run_script(['bash', 'bench/gpu_checks.sh', str(out), *args], env={'PYTHON': sys.executable}, check=check)


def planned_total(stdout):
    return int(re.search(r'total +~(\d+) s', stdout).group(1))


def test_each_call_fits_the_lease_by_its_own_estimate(tmp_path):
    first = gpu_checks(tmp_path, '--plan')
    assert [line.split()[0] for line in first.stdout.splitlines()[1:-1]] == ['tests', 'bench']
    second = gpu_checks(tmp_path, 'profile', 'accuracy', 'pretrain', '--plan')
    for plan in (first, second):
        assert planned_total(plan.stdout) <= LEASE_CALL_S, plan.stdout
    together = gpu_checks(tmp_path, 'tests', 'bench', 'profile', '--plan', check=False)
    assert together.returncode == 2 and 'over one call' in together.stderr
    assert not list(tmp_path.glob('*.json'))  # --plan runs nothing


def test_smoke_writes_every_field(tmp_path):
    result = gpu_checks(tmp_path, '--smoke')
    assert result.stdout.index('plan') < result.stdout.index('== bench')
    assert 'not in --smoke' in (tmp_path / 'tests.txt').read_text()
    data = json.loads((tmp_path / 'cpu.json').read_text())  # named after the device: the CPU in --smoke
    assert data['torch'] == torch.__version__ and data['device'] and data['peak_memory']
    assert data['driver'] is None and 'cuda' in data  # the CPU has no driver; torch's CUDA build is recorded
    assert data['model'] == 'mae_vit_tiny_patch4' and data['tflop_per_image'] > 0 and data['matmul_tflop_per_s']
    assert data['modes'] == [row['mode'] for row in data['rows']] == ['default', 'released', 'crops']
    for row in data['rows']:
        assert 'error' not in row, row
        assert row['s_per_image'] > 0 and row['warmup_s'] > 0 and row['setup_s'] >= 0 and row['peak_memory_gib'] > 0
        assert row['floor_s_per_image'] > 0 and row['speedup_vs_released_style'] > 0
        # not compiled, not on CUDA: no compile time, no CUDA graphs to count
        assert row['compile_s'] is None and row['cudagraph_skips'] is None and row['cuda_graphs'] is None
    views = {row['mode']: row['views'] for row in data['rows']}
    assert views == {'default': 'single crop', 'released': 'single crop', 'crops': 'random crops'}
    assert data['rows'][1]['speedup_vs_released_style'] == 1.0


def test_a_failed_mode_keeps_the_others(tmp_path, monkeypatch):
    """The JSON is rewritten after every mode: an error (or a timeout) in one loses only that one."""
    measure = bench_ttt.measure

    def failing(mode, *args):
        if mode == 'crops':
            raise RuntimeError('CUDA out of memory\ndetails')
        return measure(mode, *args)
    monkeypatch.setattr(bench_ttt, 'measure', failing)
    path = tmp_path / 'bench.json'
    args = bench_ttt.get_args_parser().parse_args([
        '--model', TINY, '--batch_size', '2', '--steps', '1', '--images', '1', '--repeats', '1', '--device', 'cpu',
        '--modes', 'crops', 'default', '--json', str(path)])
    with pytest.raises(SystemExit) as e:
        bench_ttt.main(args)
    assert e.value.code == 1
    rows = json.loads(path.read_text())['rows']
    assert rows[0] == {'mode': 'crops', 'flags': [], 'precision': 'fp32', 'error': 'RuntimeError: CUDA out of memory'}
    assert rows[1]['mode'] == 'default' and rows[1]['s_per_image'] > 0


def test_mode_flags():
    assert bench_ttt.mode_flags('default') == ['--single_crop']
    assert bench_ttt.mode_flags('compile+K4+bf16') == ['--single_crop', '--compile', '--parallel_images', '4',
                                                       '--amp', 'bf16']
    assert bench_ttt.mode_flags('crops') == []
    assert bench_ttt.mode_flags('released+bf16') == ['--single_crop', '--amp', 'bf16']
    for bad, fragment in (('compile+fast', "unknown mode part 'fast'"), ('released+compile', 'only a precision'),
                          ('released+crops', 'only a precision')):
        with pytest.raises(UserError, match=fragment):
            bench_ttt.mode_flags(bad)


def test_the_documented_bench_commands_parse():
    with open(os.path.join(REPO, 'docs', 'performance.md')) as f:
        blocks = re.findall(r'```bash\n(.*?)```', f.read(), flags=re.S)
    commands = [line.split('bench/bench_ttt.py', 1)[1] for block in blocks
                for line in re.sub(r'\\\n', ' ', block).splitlines() if 'bench/bench_ttt.py' in line]
    assert commands
    for command in commands:
        args = bench_ttt.get_args_parser().parse_args(shlex.split(command))
        for mode in args.modes:
            bench_ttt.mode_flags(mode)


@pytest.mark.parametrize('name, expected', [
    ('nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT', 'matmul'),  # Hopper's cuBLAS (12.8 and later)
    ('nvjet_hsh_192x128_64x5_2x1_v_bz_TNN', 'matmul'),
    ('sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32_warpgroupsize1x1x1_execute_segment_k_off_kernel'
     '__5x_cublas', 'matmul'),
    ('void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4>(Params)', 'matmul'),
    ('ampere_sgemm_128x64_tn', 'matmul'),
    ('aten::addmm', 'matmul'),
    ('void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>, false>(Flash_fwd_params)',
     'attention'),
    ('fmha_cutlassB_f32_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)', 'attention'),
    ('cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0', 'attention'),
    ('aten::_softmax', 'attention'),
    ('triton_per_fused_native_layer_norm_0', 'fused kernels'),
    ('cpp_fused_gelu_3', 'fused kernels'),
    ('void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>(int, ...)',
     'normalisation / element-wise'),
    ('aten::native_layer_norm', 'normalisation / element-wise'),
])
def test_profile_categories(name, expected):
    assert category(name, None, 1) == expected


def test_profile_bmm_is_a_matmul_only_for_k_weight_sets():
    assert category('aten::bmm', [[4, 16, 32], [4, 32, 32]], 4) == 'matmul'  # a linear layer under vmap
    assert category('aten::bmm', [[24, 17, 8], [24, 8, 17]], 4) == 'attention'
    assert category('aten::bmm', [[1, 17, 8], [1, 8, 17]], 1) == 'attention'


def test_profile_breakdown_accounts_for_the_wall_time():
    torch.manual_seed(0)
    model = build_model(TINY, norm_pix_loss=True)
    bench = argparse.Namespace(model=TINY, batch_size=2, steps=2, device='cpu', finetune_mode='encoder')
    args = bench_ttt.ttt_args(bench, 'default', model.patch_embed.img_size[0])
    parts, wall = breakdown(TestTimeTrainer(model, args, 'cpu'), torch.device('cpu'), 1)
    assert list(parts) == list(CATEGORIES) and min(parts.values()) >= 0
    assert parts['matmul'] > 0 and parts['classification'] > 0 and parts['optimiser update'] > 0
    assert sum(parts.values()) == pytest.approx(wall, rel=0.05)  # idle is the rest of the wall time


def test_the_rules_benchmark_times_each_rule_in_its_own_process(tmp_path):
    out = tmp_path / 'rules.json'
    result = run_script([sys.executable, 'bench/bench_rules.py', '--rules', 'last:1', 'lora:2', '--model', TINY,
                         '--image_size', '16', '--batch_size', '2', '--steps', '1', '--images', '1', '--repeats', '1',
                         '--device', 'cpu', '--json', str(out)])
    data = json.loads(out.read_text())
    assert [r['rule'] for r in data['rows']] == ['encoder', 'last:1', 'lora:2']  # encoder first: the reference
    assert data['rows'][0]['time_vs_encoder'] == data['rows'][0]['memory_vs_encoder'] == 1.
    assert all(r['s_per_image'] > 0 and r['peak_memory_gib'] > 0 for r in data['rows'])
    assert 'lora:2' in result.stdout and 'vs encoder' in result.stdout
