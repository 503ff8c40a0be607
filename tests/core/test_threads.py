"""threads(n): sets torch's intra-op thread count inside the block only, reads SALIENCYLAB_THREADS, and
rejects bad values with one clear line. Plus the busy-load benchmark's helpers (no timing here)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saliencylab.core.errors import ConfigError
from saliencylab.core.threads import ENV, resolve_threads, threads

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def other_count(before: int) -> int:
    return 1 if before != 1 else 2


def test_sets_inside_and_restores_after(restore_threads, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = restore_threads
    n = other_count(before)
    with threads(n) as inside:
        assert inside == n
        assert torch.get_num_threads() == n
    assert torch.get_num_threads() == before


def test_restores_after_an_error_and_after_changes_inside(restore_threads, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = restore_threads
    with pytest.raises(RuntimeError, match="boom"):
        with threads(other_count(before)):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with threads(before):  # same count asked for, then changed by the block: still restored
        torch.set_num_threads(other_count(before))
    assert torch.get_num_threads() == before


def test_nested(restore_threads, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    before = restore_threads
    with threads(1):
        with threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_environment_variable(restore_threads, monkeypatch):
    before = restore_threads
    n = other_count(before)
    monkeypatch.setenv(ENV, f" {n} ")
    assert resolve_threads() == n
    with threads() as inside:
        assert inside == n == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with threads(before):  # an explicit count wins over the variable
        assert torch.get_num_threads() == before


def test_nothing_asked_changes_nothing(restore_threads, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert resolve_threads() is None
    monkeypatch.setenv(ENV, "")
    assert resolve_threads() is None
    with threads() as inside:
        assert inside == restore_threads == torch.get_num_threads()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", "", True])
def test_bad_counts_are_one_clear_line(bad, restore_threads):
    with pytest.raises(ConfigError, match="positive whole number or .auto.") as info:
        with threads(bad):
            pass
    assert "\n" not in str(info.value)
    assert torch.get_num_threads() == restore_threads


def test_bad_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "many")
    with pytest.raises(ConfigError, match=ENV):
        resolve_threads()


def test_import_changes_nothing():
    # a fresh interpreter: importing saliencylab (and the module) leaves torch's thread counts alone
    code = ("import os, torch; a = (torch.get_num_threads(), torch.get_num_interop_threads()); "
            "os.environ['SALIENCYLAB_THREADS'] = '1'; import saliencylab, saliencylab.core.threads; "
            "b = (torch.get_num_threads(), torch.get_num_interop_threads()); print(a == b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "True"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("busy_bench", ROOT / "benchmarks" / "busy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_fair_share_and_loads():
    busy = load_benchmark()
    assert busy.parse_loads("0,C,2C", 2) == [0, 2, 4]
    assert busy.parse_loads("0, 3, 2*C", 4) == [0, 3, 8]
    assert busy.fair_share(4.0, 0, 2) == 4.0          # alone
    assert busy.fair_share(4.0, 1, 2) == 4.0          # one busy loop, one free core
    assert busy.fair_share(4.0, 4, 2) == 10.0         # 5 runnable on 2 cores: 2.5x
    assert busy.fair_share(4.0, 4, 2, threads=2) == 12.0


def test_benchmark_summary_reports_slowdown_against_fair_share():
    busy = load_benchmark()
    row = dict(threads=2, cpu_s=1.0, load_before=[1.0], involuntary_switches=0)
    rows = [dict(row, job="j", setting="default", busy=0, wall_s=2.0),
            dict(row, job="j", setting="default", busy=4, wall_s=10.0, cpu_s=3.0)]
    table = {r["busy"]: r for r in busy.summarise({"cores": 2, "rows": rows})}
    assert table[4]["fair_s"] == 5.0 and table[4]["slowdown_vs_fair"] == 2.0
    assert table[4]["cpu_vs_alone"] == 3.0
    assert table[0]["slowdown_vs_fair"] == 1.0


def test_auto_uses_the_idle_cores():
    from saliencylab.core.threads import auto_threads

    assert auto_threads(load=0.1, cores=2, default=2) == 2      # quiet: torch's default
    assert auto_threads(load=0.9, cores=2, default=2) == 1      # one core busy elsewhere
    assert auto_threads(load=12.0, cores=2, default=2) == 1     # overloaded: one thread, never 0
    assert auto_threads(load=3.0, cores=16, default=16) == 13
    assert auto_threads(load=0.0, cores=16, default=4) == 4     # never above torch's default


def test_auto_from_the_environment(restore_threads, monkeypatch):
    monkeypatch.setenv(ENV, "AUTO")
    n = resolve_threads()
    assert restore_threads >= n >= 1
    with threads("auto") as inside:
        assert inside == torch.get_num_threads() >= 1
    assert torch.get_num_threads() == restore_threads


def test_benchmark_end_to_end_with_a_busy_loop(tmp_path):
    # the tiny job (no model) alone and beside one busy loop; the busy loop is ended afterwards
    busy = load_benchmark()
    with busy.BusyLoad(1) as load:
        assert len(load.procs) == 1 and load.procs[0].poll() is None
    assert all(not Path(f"/proc/{pid}").exists() for pid in load.pids)
    assert busy.main(["--jobs", "tiny", "--loads", "0,1", "--threads", "1", "--out", str(tmp_path),
                      "--name", "t"]) == 0
    import json
    result = json.loads((tmp_path / "t.json").read_text())
    assert {(r["busy"], r["setting"]) for r in result["rows"]} == {(0, "1"), (1, "1")}
    assert all(r["wall_s"] > 0 and r["load_before"] for r in result["rows"])
    assert "| tiny | 1 (1) | 1 |" in (tmp_path / "t.md").read_text()


def test_auto_counts_the_processes_running_now_not_the_load_average(tmp_path, monkeypatch):
    """The 1-minute load average still holds the user's previous command; procs_running is now."""
    from saliencylab.core import threads as module

    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 1\nprocs_blocked 0\n")
    assert module.running_elsewhere(samples=3, interval=0, stat=str(stat)) == 0  # only this process
    stat.write_text("cpu  1 2 3\nprocs_running 3\n")
    assert module.running_elsewhere(samples=3, interval=0, stat=str(stat)) == 2
    assert module.running_elsewhere(stat=str(tmp_path / "missing")) is None
    monkeypatch.setattr(module, "running_elsewhere", lambda: 0.0)
    monkeypatch.setattr(module.os, "getloadavg", lambda: (1.4, 1.0, 0.5))  # a previous command, now finished
    assert module.auto_threads(cores=2, default=2) == 2
    monkeypatch.setattr(module, "running_elsewhere", lambda: 2.0)
    assert module.auto_threads(cores=2, default=2) == 1
    monkeypatch.setattr(module, "running_elsewhere", lambda: None)  # not Linux: the load average
    assert module.auto_threads(cores=2, default=2) == 1
