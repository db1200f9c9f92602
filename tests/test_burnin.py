"""Burn-in on 8 fake CPU devices: healthy runs pass, and every injected fault is found on the right device."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from keel.cli import main
from keel.diag.burnin import CHECKS, Settings, run_burnin
from keel.diag.inject import Faults
from keel.diag.verdicts import CHECK_NAMES, EXIT_CODES, PASS, SLOW, WRONG

TIMING = ["matmul", "memory", "collectives", "sustained"]
SETTINGS = dataclasses.replace(Settings.for_platform("cpu", quick=True), sustained_s=0.4, windows=4)


def _run(checks, faults=None, settings=SETTINGS):
    return run_burnin(checks, faults=faults, settings=settings, progress=False)


def _blamed(report):
    return {d: v for d, v in report.device_verdicts().items() if v != PASS}


def test_checks_registry_matches_the_cli_list():
    assert tuple(CHECKS) == CHECK_NAMES


def test_healthy_devices_pass_every_check():
    report = _run(list(CHECKS))
    assert report.errors == {}
    assert report.verdict() == PASS and report.exit_code() == 0, report.table()
    checks = {m.check for m in report.measurements}
    assert checks == {"matmul", "known_answer", "sdc", "memory", "collectives", "sustained", "model_step"}


def test_twenty_healthy_runs_raise_no_false_alarm():
    for _ in range(20):
        report = _run(TIMING)
        assert report.verdict() == PASS, report.table()


FAULTS = {
    "slow device": (Faults(slow={3: 3.0}), ["matmul", "memory", "sustained"], {3: SLOW}),
    "bit flip": (Faults(bitflip={5}), ["known_answer", "sdc", "model"], {5: WRONG}),
    "nondeterministic": (Faults(flaky={2}), ["sdc", "model"], {2: WRONG}),
    "corrupted collective": (Faults(bad_collective={6}), ["collectives"], {6: WRONG}),
    "throttling": (Faults(throttle={1: 0.2}), ["sustained"], {1: SLOW}),
    "two slow devices": (Faults(slow={0: 4.0, 7: 4.0}), ["matmul"], {0: SLOW, 7: SLOW}),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_injected_fault_is_found_on_the_right_device(name):
    faults, checks, expect = FAULTS[name]
    report = _run(checks, faults)
    assert _blamed(report) == expect, report.table()
    assert report.exit_code() == EXIT_CODES[max(expect.values(), key=[PASS, SLOW, WRONG].index)]


def test_slow_link_is_named():
    ids = [d.id for d in jax.devices()]
    report = _run(["collectives"], Faults(slow_link={(ids[4], ids[5]): 5.0}))
    slow = [m for m in report.measurements if m.verdict == SLOW]
    assert [m.link for m in slow] == [(ids[4], ids[5])], report.table()


def test_a_check_that_crashes_is_could_not_run(monkeypatch):
    def broken(ctx):
        raise RuntimeError("device lost")

    monkeypatch.setitem(CHECKS, "matmul", broken)
    report = _run(["matmul"])
    assert "device lost" in report.errors["matmul"]
    assert report.verdict() == "could_not_run" and report.exit_code() == 12


def test_cli_json_report_and_fleet(tmp_path, capsys):
    path = tmp_path / "node0.json"
    code = main(["burnin", "--quick", "--checks", "known_answer,sdc", "--json", str(path), "--no-progress"])
    assert code == 0
    doc = json.loads(path.read_text())
    assert doc["schema"] == "keel.burnin/1" and doc["verdict"] == "pass"
    assert len(doc["devices"]) == 8 and doc["platform"]["backend"] == "cpu" and doc["platform"]["jax"]
    assert {m["check"] for m in doc["measurements"]} == {"known_answer", "sdc"}
    assert "verdict: PASS" in capsys.readouterr().out

    # A fleet of seven nodes: one whose every device is 10x slow (invisible alone), one with a wrong device.
    # The healthy nodes are one measured report with +-10 % node-to-node spread: on one shared CPU, runs made one
    # after another are not independent nodes (a burst of other work would slow a whole "node").
    healthy = _run(["matmul"]).to_json()
    rng = np.random.default_rng(0)
    reports = []
    for i in range(6):
        if i == 2:
            r = _run(["matmul"], Faults(slow={d.id: 10.0 for d in jax.devices()})).to_json()
            assert r["verdict"] == PASS  # the slow node cannot see it alone
        else:
            r = json.loads(json.dumps(healthy))
            scale = rng.uniform(0.9, 1.1)
            for m in r["measurements"]:
                m["value"] *= scale
        reports.append(r | {"host": f"node{i}"})
    reports.append(_run(["known_answer"], Faults(bitflip={3})).to_json() | {"host": "node6"})
    paths = []
    for r in reports:
        paths.append(tmp_path / f"{r['host']}.json")
        paths[-1].write_text(json.dumps(r))
    capsys.readouterr()
    cpu = ["--tolerance", "0.5", "--z", "3"]  # CPU devices are noisy; accelerators use the defaults
    assert main(["burnin", "fleet", *map(str, paths), *cpu]) == 10
    out = capsys.readouterr().out
    assert "drain: node2 node6" in out, out
    healthy = [str(p) for i, p in enumerate(paths) if i not in (2, 6)]
    assert main(["burnin", "fleet", *healthy, *cpu]) == 0, capsys.readouterr().out


def test_unknown_check_is_a_config_error(capsys):
    assert main(["burnin", "--checks", "matmul,nope", "--no-progress"]) == 2
    assert "unknown burn-in check 'nope'" in capsys.readouterr().err


def test_node_label_patch_sets_and_clears_the_taint():
    from keel.diag.label import LABEL, TAINT_KEY, node_patch

    other = {"key": "nvidia.com/gpu", "effect": "NoSchedule"}
    bad = node_patch({"verdict": "wrong"}, [other], now=5)
    assert bad["metadata"]["labels"] == {LABEL: "wrong", f"{LABEL}-time": "5"}
    assert bad["spec"]["taints"] == [other, {"key": TAINT_KEY, "value": "wrong", "effect": "NoSchedule"}]
    good = node_patch({"verdict": "pass"}, bad["spec"]["taints"], now=6)
    assert good["spec"]["taints"] == [other] and good["metadata"]["labels"][LABEL] == "pass"
