"""`herd plan` on the real Llama shapes."""
import argparse

from workers.parallel.plan import REAL_SHAPES, model_shape, plan, register_plan_cli


def run(argv, capsys):
    parser = argparse.ArgumentParser()
    register_plan_cli(parser.add_subparsers())
    args = parser.parse_args(["plan"] + argv)
    rc = args.func(args)
    return rc, capsys.readouterr().out


def test_llama2_70b_on_8x80gib_fits_tp8_or_tp4_pp2(capsys):
    rc, out = run(["--shape", "llama2-70b", "--gpus-per-node", "8", "--gpu-memory", "80GiB"], capsys)
    assert rc == 0
    assert "recommended: TP8×PP1" in out and "TP4×PP2" in out
    layouts = {(l.tp, l.pp): l for l in plan(model_shape("llama2-70b"), gpus_per_node=8, gpu_memory=80 << 30)}
    for key in ((8, 1), (4, 2)):
        l = layouts[key]
        assert l.fits and l.weight_bytes + l.kv_bytes <= 80 << 30
        assert 15 << 30 < l.weight_bytes < 18 << 30   # ≈ 138 GB of bf16 weights / 8
    assert model_shape("llama2-70b").num_params > 68e9


def test_llama2_70b_does_not_fit_one_24gib_gpu(capsys):
    rc, out = run(["--shape", "llama2-70b", "--gpus-per-node", "1", "--gpu-memory", "24GiB"], capsys)
    assert rc == 1 and "no layout fits" in out


def test_every_real_shape_parses_and_small_models_fit_one_gpu():
    for name in REAL_SHAPES:
        cfg = model_shape(name)
        assert cfg.num_params > 1e9
    assert plan(model_shape("llama3.2-1b"), gpus_per_node=1, gpu_memory=24 << 30, max_model_len=8192)[0].fits
