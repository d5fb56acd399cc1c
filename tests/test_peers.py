"""benchmarks/peers.py: selfreplay's head KL is the number Liger's and the full-logit KL compute,
and the script's measurement and bookkeeping work (its timings are taken on a quiet machine)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from selfreplay.objective.losses import head_kl_divergence

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


def _peers():
    spec = importlib.util.spec_from_file_location("peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module
    spec.loader.exec_module(module)
    return module


def _inputs(rows=700, D=24, V=300, seed=0):
    """Teacher hidden/head, student hidden/head (with gradients): 700 rows span two of selfreplay's blocks."""
    g = torch.Generator().manual_seed(seed)
    th, tw = torch.randn(rows, D, generator=g), torch.randn(V, D, generator=g) * 2 / D**0.5
    h = (th + 0.5 * torch.randn(rows, D, generator=g)).requires_grad_()
    w = (tw + torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    return th, tw, h, w


def _value_and_grads(loss_fn, th, tw, h, w):
    h.grad = w.grad = None
    value = loss_fn(th, tw, h, w)
    value.backward()
    return value.detach().double(), h.grad.clone(), w.grad.clone()


def _exact_forward_kl(th, tw, h, w):
    """Mean over rows of KL(teacher ‖ student) in float64, the definition every path must meet."""
    teacher = F.log_softmax(th.double() @ tw.double().T, dim=-1)
    student = F.log_softmax(h.double() @ w.double().T, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol)


def test_head_kl_is_the_full_logit_forward_kl():
    peers = _peers()
    th, tw, h, w = _inputs()
    ours = _value_and_grads(head_kl_divergence, th, tw, h, w)
    _assert_same(ours, _value_and_grads(peers.full_logit_kl, th, tw, h, w))
    assert ours[0].item() == pytest.approx(_exact_forward_kl(th, tw, h, w).item(), rel=1e-5)


def test_liger_beta0_is_selfreplays_kl_in_value_and_gradients():
    pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel is not installed (pip install liger-kernel)")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    th, tw, h, w = _inputs()
    ours = _value_and_grads(head_kl_divergence, th, tw, h, w)
    labels = torch.zeros(len(h), dtype=torch.long)
    for chunk in (256, 1024):  # several chunks, and one
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False,
                                        chunk_size=chunk)
        _assert_same(ours, _value_and_grads(lambda a, b, c, d, liger=liger: liger(c, d, a, b, labels), th, tw, h, w))
    # the benchmark's wiring of both
    peers = _peers()
    _assert_same(_value_and_grads(peers.kl_function("selfreplay"), th, tw, h, w),
                 _value_and_grads(peers.kl_function("liger"), th, tw, h, w))
    # beta = 1 is the reverse KL(student ‖ teacher): a different number, so the agreement above is not loose
    reverse = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=False)
    assert abs(reverse(h, w, th, tw, labels).item() - ours[0].item()) > 1e-2


def test_liger_ignore_index_averages_over_the_counted_rows_as_selfreplay():
    pytest.importorskip("liger_kernel.chunked_loss", reason="Liger-Kernel is not installed (pip install liger-kernel)")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    th, tw, h, w = _inputs(rows=300)
    labels = torch.zeros(len(h), dtype=torch.long)
    labels[::3] = -100
    keep = labels != -100
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=False)
    kept = head_kl_divergence(th[keep], tw, h[keep], w)
    assert liger(h, w, th, tw, labels).item() == pytest.approx(kept.item(), rel=1e-5)


def test_every_trainer_runs_float32_without_recomputation(tmp_path):
    """TRL's SFTConfig defaults to bf16 and activation checkpointing; the benchmark's arguments turn
    both off, so SFTTrainer and SelfReplayTrainer train the same way."""
    pytest.importorskip("transformers")
    peers = _peers()
    spec = {"optim": peers.PLAIN_OPTIM, "batch": 2, "T": 16, "steps": 1, "seed": 0, "device": "cpu"}
    arguments = peers.trainer_arguments(spec, str(tmp_path))
    configs = []
    if importlib.util.find_spec("trl") is not None:
        from trl import SFTConfig

        configs.append(SFTConfig(**arguments))
    from selfreplay.hf.trainer import SelfReplayConfig

    configs.append(SelfReplayConfig(**arguments, replay_method="none"))
    for config in configs:
        assert (config.bf16, config.fp16, config.activation_checkpointing) == (False, False, False), type(config)


def test_at_new_loss_interpolates_at_the_first_crossing():
    peers = _peers()
    curve = [{"new_loss": 4.0, "forgetting": 0.0, "train_seconds": 0.0},
             {"new_loss": 3.0, "forgetting": 1.0, "train_seconds": 10.0},
             {"new_loss": 3.5, "forgetting": 2.0, "train_seconds": 20.0},
             {"new_loss": 2.0, "forgetting": 3.0, "train_seconds": 30.0}]
    assert peers.at_new_loss(curve, 3.25) == pytest.approx({"forgetting": 0.75, "train_seconds": 7.5})
    assert peers.at_new_loss(curve, 4.5) == {"forgetting": 0.0, "train_seconds": 0.0}
    assert peers.at_new_loss(curve, 1.0) is None


def test_memory_probe_sees_what_was_allocated_after_its_start():
    if not Path("/proc/self/status").is_file():
        pytest.skip("the probe reads /proc (Linux)")
    peers = _peers()
    probe = peers.MemoryProbe("cpu")
    probe.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
    assert 60 < probe.peak_mib() < 200 and block[-1] == 1


def test_a_failing_worker_is_recorded_in_one_line(tmp_path):
    peers = _peers()
    ctx = peers.Context(quick=True, work=tmp_path, device="cpu", memory_cap_gib=8, timeout=120)
    out = peers.run_worker(ctx, {"kind": "kl", "method": "nonsense", "V": 8, "rows": 4, "D": 2, "warmup": 0,
                                 "repeats": 1, "measure": "time"}, "failing")
    assert out == {"error": "ValueError: unknown KL method 'nonsense': one of " + ", ".join(peers.KL_METHODS)}


def test_quick_kl_part_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--parts", "kl", "--kl-methods", "selfreplay,full_logits",
                           "--kl-vocab", "512,256", "--kl-rows", "128", "--kl-dims", "32", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300, check=False, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["environment"]["packages"]["torch"] == torch.__version__
    assert set(result) >= {"environment", "kl"} and "finetune" not in result
    shapes = result["kl"]["shapes"]
    assert [(s["V"], s["rows"], s["D"]) for s in shapes] == [(512, 128, 32), (256, 128, 32)]  # the flags' shapes
    methods = shapes[0]["methods"]
    assert shapes[0]["agreement_reference"] == "selfreplay" and sorted(methods) == ["full_logits", "selfreplay"]
    for m in methods.values():
        assert m["seconds"] > 0 and m["peak_mib"] > 0 and m["value"] > 0, m
    agreement = methods["full_logits"]["agreement"]
    assert agreement["agrees"] and agreement["value_rel"] < 1e-5, agreement
    assert "full_logits" in done.stdout and str(out) in done.stdout  # the table


def test_size_flags_replace_the_defaults_and_bad_lists_are_one_usage_line(capsys):
    import argparse

    peers = _peers()
    parser = argparse.ArgumentParser()
    for flag in ("--seeds", "--kl-methods", "--kl-vocab", "--kl-rows", "--kl-dims"):
        parser.add_argument(flag)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kl-repeats", type=int)
    full = peers.SIZES["full"]
    args = parser.parse_args(["--seeds", "0", "--kl-vocab", "4096,32768", "--kl-rows", "2048"])
    assert peers.kl_finetune_sizes(parser, args, full["kl_finetune"])["seeds"] == [0]
    kl = peers.kl_sizes(parser, args, full["kl"])
    assert (kl["V"], kl["rows"], kl["D"]) == ([4096, 32768], [2048], full["kl"]["D"])
    assert full["kl"]["rows"] == [2048, 8192] and full["kl_finetune"]["seeds"] == [0, 1, 2]  # defaults untouched
    assert "liger_triton" not in kl["methods"]  # Triton's kernel only where it runs: on CUDA
    assert peers.kl_sizes(parser, parser.parse_args(["--device", "cuda"]), full["kl"])["methods"][-1] == "liger_triton"
    for bad in (["--seeds", "zero"], ["--seeds", ","]):
        with pytest.raises(SystemExit) as exit_:
            peers.kl_finetune_sizes(parser, parser.parse_args(bad), full["kl_finetune"])
        assert exit_.value.code == 2 and "--seeds takes whole numbers" in capsys.readouterr().err


def _run(*points):
    """A logged run from (new_loss, forgetting, train_seconds) points."""
    return {"curve": [{"new_loss": n, "forgetting": f, "train_seconds": s} for n, f, s in points]}


def test_a_peer_that_stops_short_of_the_target_is_read_where_all_its_seeds_got_to():
    peers = _peers()
    slow = [_run((6.0, 0.0, 0), (5.0, 0.01, 100), (4.6, 0.02, 600)),  # the anchor: never reaches 4.0
            _run((6.0, 0.0, 0), (4.8, 0.02, 100), (4.5, 0.03, 600))]
    assert peers.common_loss(slow, 4.0) == 4.6  # the lowest loss both seeds reached
    fast = [_run((6.0, 0.0, 0), (4.4, 0.05, 10), (3.9, 0.08, 20))] * 2  # at 4.6: 0.05 - 0.2/1.6 * 0.05 = 0.04375
    gentle = [_run((6.0, 0.0, 0), (4.6, 0.01, 40), (4.2, 0.02, 600)),
              _run((6.0, 0.0, 0), (4.4, 0.012, 40), (4.2, 0.02, 600))]  # at 4.6: 0.01 and 0.012 * 1.4/1.6
    runs = {"kl": fast, "kl_c100": gentle, "kl_new_c1": [_run((6.0, 0.0, 0), (3.9, 0.3, 20))] * 2,
            "kl_new_c10": slow, "trl_sdft": [{"error": "RuntimeError: no"}]}
    compared = peers.kl_against_peers(runs, 4.0)
    anchor = compared["kl_new_c10"]
    assert anchor["new_loss"] == 4.6 and anchor["self_replay"] == "kl_c100"  # the coefficient that forgot less there
    assert anchor["forgetting"] == pytest.approx((0.01 + 0.0105) / 2)
    assert anchor["peer_forgetting"] == pytest.approx((0.02 + (0.02 + 0.01 * 2 / 3)) / 2)
    assert anchor["spread"] == pytest.approx(0.01 * 2 / 3)  # the peer's, the larger of the two
    assert anchor["kl_lower_beyond_spread"] and anchor["peer_seconds"] == pytest.approx((600 + 100 + 500 * 2 / 3) / 2)
    assert anchor["every_self_replay_run"]["kl"] == pytest.approx(0.04375)
    first = compared["kl_new_c1"]  # reached the target: read there, where only c = 10 got to
    assert first["new_loss"] == 4.0 and first["self_replay"] == "kl" and first["forgetting"] == pytest.approx(0.074)
    assert first["kl_lower_beyond_spread"] and not compared["trl_sdft"]["compared"]
