"""`keel plan` as a user runs it: the table, --json, --plot, checkpoint advice, errors, --check."""

import json
import struct

import pytest

from keel.cli import main

RNJ1 = ["plan", "--config", "rnj1-8b", "--hardware", "h200"]


def test_plan_prints_a_table_with_the_best_row_marked(capsys):
    assert main([*RNJ1, "--chips", "256", "--checkpoint-blocking-s", "5", "--top", "5"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("*")]
    assert len(rows) == 1 and "yes" in rows[0]
    assert "8.32B parameters, 512 x 8192 tokens per step" in out and "on 256 x H200" in out
    assert "best: mesh" in out and "MFU" in out and "more rows (--top 0 for all)" in out
    assert "checkpoint every" in out and "Young/Daly for a 5 s blocking save" in out


def test_plan_json_has_every_row_and_the_issue_arguments(capsys):
    args = [*RNJ1, "--chips", "1024", "--seq-len", "8192", "--global-batch", "4M-tokens", "--json",
            "--checkpoint-blocking-s", "5", "--mtbf-hours", "3", "--remat", "full,dots_no_batch"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["batch_size"] == 512 and report["config"]["seq_len"] == 8192
    assert report["chips"] == 1024 and report["hardware"] == "H200"
    rows = report["rows"]
    assert {r["remat"] for r in rows} == {"full", "dots_no_batch"}
    assert all(r["mesh"]["data"] * r["mesh"]["fsdp"] * r["mesh"]["tensor"] == 1024 for r in rows)
    best = [r for r in rows if r["best"]]
    assert len(best) == 1 and best[0]["feasible"] and best[0] == rows[0]
    for key in ("parameters", "optimizer", "gradients", "activations", "fsdp_buffers", "muon", "total"):
        assert key in best[0]["memory"]
    for key in ("compute_s", "fsdp_s", "tensor_s", "muon_s", "exposed_s", "overlapped_s", "total_s"):
        assert key in best[0]["time"]
    ckpt = report["checkpoint"]
    assert ckpt["interval_s"] / 60 == pytest.approx(5.48, abs=0.01) and ckpt["badput"] == pytest.approx(0.0304,
                                                                                                          abs=1e-3)


def test_plan_on_a_v5p_slice_with_muon(capsys):
    assert main(["plan", "--config", "rnj1-8b", "optim.name=muon", "--hardware", "v5p", "--chips", "128",
                 "--global-batch", "128", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hardware"] == "TPU v5p" and report["config"]["optimizer"] == "muon"
    best = next(r for r in report["rows"] if r["best"])
    assert best["memory"]["muon"] > 0 and best["time"]["muon_s"] > 0


def test_plan_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main([*RNJ1, "--chips", "32", "--remat", "full,dots_no_batch", "--plot", str(png)]) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    head = png.read_bytes()
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 800 and height >= 600


@pytest.mark.parametrize("args,message", [
    (["--hardware", "a100", "--chips", "8"], "unknown accelerator 'a100'"),
    (["--chips", "8", "--remat", "some"], "--remat 'some'"),
    (["--chips", "8", "--global-batch", "3-tokens"], "--global-batch"),
    (["--chips", "3"], "no (data x fsdp x tensor) mesh of 3 chips"),
    ([], "needs --chips"),
])
def test_plan_refuses_bad_arguments(args, message, capsys):
    assert main(["plan", "--config", "rnj1-8b", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_plan_check_compiles_the_configs_step(capsys):
    small = ["model.vocab_size=256", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
             "model.n_kv_heads=2", "model.head_dim=16", "model.mlp_dim=128", "data.seq_len=32",
             "train.batch_size=8"]
    assert main(["plan", "--config", "tiny", "--config", "fsdp_tp", *small, "--check"]) == 0
    out = capsys.readouterr().out
    assert "mesh 1x4x2 (data x fsdp x tensor)" in out and "peak memory / device" in out
    assert "reduce over tensor bytes" in out
