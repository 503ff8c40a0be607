"""Speed on a busy machine: a fixed job run alone, then beside K busy-loop processes, with several torch
thread counts; wall time against the fair-share expectation, and the job's CPU time.

Usage:  python benchmarks/busy.py [--jobs iba,evaluate] [--loads 0,C,2C] [--threads default,1] [--repeats 1]
                                  [--profile] [--out benchmarks/results]

Jobs (each in a fresh child process; the model load and a warm-up call are not timed):
- iba: IBA (defaults) on 2 bundled photos with the embedded EfficientNet-Lite0;
- evaluate: gradient, integrated_gradients and gradcam on 3 photos, each map scored with deletion and
  insertion (metric defaults): the `saliencylab evaluate` work without the files.
Load: K processes running `while True: pass` (pure Python, one core each when they get it), started before
and stopped after each load level; K = 0 is the machine as it is (this script records os.getloadavg()
with every measurement, since the machine may already be busy with other work).
Fair share: each runnable thread gets an equal share of the C cores, so beside K busy loops a job that
took T alone should take T x (K + 1) / C when K + 1 > C (the job counted as one thread, the user's
expectation), and no less than T x (K + t) / C for a job whose t threads all run (the scheduler's
per-thread share). Slowdown = wall time / the first. CPU time is the job's own process time (all its
threads): it stays flat under load unless threads spin-wait for each other.
`--profile` adds, per job, the number of torch operator calls and the share of time in the 20 most
called ones (torch.profiler), run once alone.
Writes <out>/<name>.json and <out>/<name>.md (--name, default busy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# -- the jobs (run in a child process) -------------------------------------------------------------------
def _setup(job: str):
    import torch

    if job == "tiny":  # for the tests: a few small operator calls, no model
        def run(m=1):
            a = torch.randn(64, 64)
            for _ in range(50):
                a = torch.tanh(a @ a.T / 64)
            return a
        return run

    import saliencylab as sl
    from saliencylab import images, models

    sl.set_progress(False)
    loaded = models.load("efficientnet_lite0")
    photos = list(images.samples().values())
    n = 2 if job == "iba" else 3
    x = torch.stack([loaded.preprocess(p.image) for p in photos[:n]])
    model = loaded.model

    if job == "iba":
        def run(m=n):
            return sl.explain(model, x[:m], "iba", image_ids=list(range(m))).maps
    elif job == "evaluate":
        def run(m=n):
            out = []
            for method in ("gradient", "integrated_gradients", "gradcam"):
                e = sl.explain(model, x[:m], method)
                for metric in ("deletion", "insertion"):
                    out.append(sl.evaluate(model, x[:m], e, metric))
            return out
    else:
        raise SystemExit(f"unknown job {job!r}")
    return run


def child(job: str, threads: str, warmup: bool, profile: bool) -> dict:
    """Run `job` once (after a warm-up) and return its timings as a dict."""
    warnings.filterwarnings("ignore")
    import torch

    from saliencylab.core.threads import threads as use_threads

    run = _setup(job)
    with use_threads(None if threads == "default" else int(threads)) as n:
        if warmup:
            run(2 if job == "iba" else 1)  # a small run: one-time costs (caches, set-up) out of the timing
        la0 = load_avg()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        c0, t0 = time.process_time(), time.perf_counter()
        if profile:
            from torch.profiler import ProfilerActivity, profile as tprofile
            with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                run()
        else:
            run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        row = {"job": job, "threads": n, "interop_threads": torch.get_num_interop_threads(),
               "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
               "voluntary_switches": ru1.ru_nvcsw - ru0.ru_nvcsw,
               "involuntary_switches": ru1.ru_nivcsw - ru0.ru_nivcsw,
               "load_before": la0, "load_after": load_avg(),
               "omp_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}}
        if profile:
            events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
            calls = sum(e.count for e in events if e.key.startswith("aten::"))
            top = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.count)[:20]
            self_total = sum(e.self_cpu_time_total for e in events) or 1.0
            row["aten_calls"] = calls
            row["top_ops"] = [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
                               "us_per_call": round(e.self_cpu_time_total / max(e.count, 1), 1)} for e in top]
            row["top20_self_share"] = round(sum(e.self_cpu_time_total for e in top) / self_total, 3)
    return row


def setting_env(setting: str) -> tuple[str, dict]:
    """A thread setting -> (the child's --threads value, its environment).

    'default': torch as it starts; 'N': threads(N); 'N/passive': threads(N) with OMP_WAIT_POLICY=PASSIVE (idle
    OpenMP threads sleep at once instead of spinning; read only at start, hence the environment);
    'omp1': OMP_NUM_THREADS=1 in the environment (what the issue tried)."""
    env = dict(os.environ)
    if setting == "omp1":
        env["OMP_NUM_THREADS"] = "1"
        return "default", env
    if setting.endswith("/passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        setting = setting[: -len("/passive")]
    return setting, env


def run_child(job: str, setting: str, warmup: bool = True, profile: bool = False, timeout: float | None = None) -> dict:
    threads, env = setting_env(setting)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--threads", threads]
    if not warmup:
        cmd.append("--no-warmup")
    if profile:
        cmd.append("--profile")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:  # the whole child (start, load, warm-up, job) ran past the limit
        return {"job": job, "threads": int(threads) if threads.isdigit() else -1, "timeout": True,
                "wall_s": None, "cpu_s": None, "voluntary_switches": 0, "involuntary_switches": 0,
                "load_before": load_avg(), "load_after": load_avg()}
    if out.returncode != 0:
        raise RuntimeError(f"child {job}/{setting} failed: {out.stderr.strip()[-2000:]}")
    # the last JSON line: the profiler may print lines of its own after it
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


# -- the busy load ---------------------------------------------------------------------------------------
class BusyLoad:
    """K pure-Python busy-loop processes, started on entry and ended on exit (by their own ids)."""

    def __init__(self, k: int):
        self.k, self.procs = k, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.k)]
        time.sleep(1.0 if self.k else 0.0)  # let them reach the scheduler
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.pids, self.procs = [p.pid for p in self.procs], []


def fair_share(alone: float, k: int, cores: int, threads: int = 1) -> float:
    """Expected wall time beside k busy loops on `cores` cores of a job that took `alone` by itself, when
    each of its `threads` runnable threads gets the share every busy loop gets (threads=1: the job counted
    as one, the user's expectation)."""
    return alone * max(1.0, (k + min(threads, cores)) / cores)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_loads(text: str, cores: int) -> list[int]:
    """'0,C,2C' (or 2*C) -> [0, cores, 2 * cores]."""
    out = []
    for item in text.split(","):
        item = item.strip().replace("*", "")
        out.append(int(item[:-1] or 1) * cores if item.endswith("C") else int(item))
    return out


# -- driver ----------------------------------------------------------------------------------------------
def measure(args) -> dict:
    cores = available_cores()
    loads = parse_loads(args.loads, cores)
    settings = args.threads.split(",")
    jobs = args.jobs.split(",")
    rows = []
    partial = dict(cores=cores, loads=loads, settings=settings, jobs=jobs, rows=rows, args=vars(args))
    for job in jobs:
        for k in loads:
            with BusyLoad(k):
                for rep in range(args.repeats):
                    for t in (settings if rep % 2 == 0 else settings[::-1]):  # interleaved against drift
                        row = run_child(job, t, timeout=args.child_timeout)
                        row.update(busy=k, repeat=rep, setting=t)
                        rows.append(row)
                        print(f"K={k} {job:9s} {t:10s} wall {row['wall_s']} s  cpu {row['cpu_s']} s"
                              f"  load {row['load_before']}", flush=True)
                        Path(args.out).mkdir(parents=True, exist_ok=True)  # what is done survives a timeout
                        (Path(args.out) / f"{args.name}.partial.json").write_text(json.dumps(partial, indent=1))
    profiles = {}
    if args.profile:
        for job in jobs:
            for t in settings:
                p = run_child(job, t, profile=True)
                profiles[f"{job}/{t}"] = p
                print(f"profile {job} threads={t}: {p['aten_calls']} aten calls, wall {p['wall_s']} s", flush=True)
    import torch

    return {"cores": cores, "loads": loads, "settings": settings, "jobs": jobs, "rows": rows, "profiles": profiles,
            "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
            "default_threads": torch.get_num_threads(), "default_interop_threads": torch.get_num_interop_threads(),
            "parallel_backend": "OpenMP" if "OpenMP" in torch.__config__.parallel_info() else "other",
            "load_average_start": rows[0]["load_before"] if rows else load_avg(), "load_average_end": load_avg(),
            "args": vars(args), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def summarise(result: dict) -> list[dict]:
    """Median per (job, setting, K), with the fair-share expectation from the K = 0 row."""
    import statistics

    cores = result["cores"]
    table = []
    groups = {}
    for r in result["rows"]:
        if r.get("timeout"):
            table.append({"job": r["job"], "setting": r["setting"], "threads": r["threads"], "busy": r["busy"],
                          "wall_s": f"> {result['args'].get('child_timeout')} (whole child)", "cpu_s": "",
                          "load": [r["load_before"][0]] if r["load_before"] else [], "involuntary_switches": 0})
            continue
        groups.setdefault((r["job"], r["setting"], r["busy"]), []).append(r)
    for (job, setting, k), rs in groups.items():
        quiet_rows = groups.get((job, setting, 0))
        wall = statistics.median(r["wall_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs)
        line = {"job": job, "setting": setting, "threads": rs[0]["threads"], "busy": k, "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2), "load": [r["load_before"][0] for r in rs if r["load_before"]],
                "involuntary_switches": int(statistics.median(r["involuntary_switches"] for r in rs))}
        if quiet_rows:
            quiet = statistics.median(r["wall_s"] for r in quiet_rows)
            quiet_cpu = statistics.median(r["cpu_s"] for r in quiet_rows)
            fair = fair_share(quiet, k, cores)
            line.update(fair_s=round(fair, 2), slowdown_vs_fair=round(wall / fair, 2),
                        thread_fair_s=round(fair_share(quiet, k, cores, rs[0]["threads"]), 2),
                        cpu_vs_alone=round(cpu / quiet_cpu, 2))
        table.append(line)
    return table


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result["table"] = summarise(result)
    name = result["args"].get("name", "busy")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# Speed on a busy machine",
        "",
        f"{result['cores']} cores ({result['machine']}), torch {result['torch']} ({result['parallel_backend']}, "
        f"default {result['default_threads']} intra-op / {result['default_interop_threads']} inter-op threads), "
        f"{result['when']}. Load average (1 min) at start {result['load_average_start']}, "
        f"at end {result['load_average_end']}. Command: `python benchmarks/busy.py "
        f"--jobs {','.join(result['jobs'])} --loads {result['args']['loads']} --threads {result['args']['threads']} "
        f"--repeats {result['args']['repeats']}"
        + (f" --child-timeout {result['args']['child_timeout']:g}" if result["args"].get("child_timeout") else "")
        + (f" --cpus {result['args']['cpus']}" if result["args"].get("cpus") else "") + "`.",
        "",
        "K = busy-loop processes beside the job; `alone` = the K = 0 row of the same setting (which is the "
        "machine as it was: see the load column). fair = alone x max(1, (K+1)/cores); thread-fair = alone x "
        "max(1, (K+t)/cores) for t threads. cpu/alone: the job's CPU time against its K = 0 CPU time "
        "(> 1: work wasted waiting in a spin).",
        "",
        "| job | threads | K | load (1 min) | wall s | CPU s | fair s | thread-fair s | wall / fair | cpu/alone | invol. switches |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(result["table"], key=lambda r: (r["job"], r["busy"], str(r["setting"]))):
        shown = r['threads'] if r['threads'] > 0 else "?"  # a timed-out child never said
        lines.append(f"| {r['job']} | {r['setting']} ({shown}) | {r['busy']} | "
                     f"{', '.join(f'{v:.1f}' for v in r['load'])} | {r['wall_s']} | {r['cpu_s']} | "
                     f"{r.get('fair_s', '')} | {r.get('thread_fair_s', '')} | {r.get('slowdown_vs_fair', '')} | "
                     f"{r.get('cpu_vs_alone', '')} | {r['involuntary_switches']} |")
    if result.get("profiles"):
        lines += ["", "## Operator calls (torch.profiler, one run, K = 0)", "",
                  "| job | threads | wall s | aten calls | top ops by calls (calls, µs/call) |", "| --- | --- | --- | --- | --- |"]
        for key, p in result["profiles"].items():
            top = ", ".join(f"{o['op'].replace('aten::', '')} {o['calls']} ({o['us_per_call']})" for o in p["top_ops"][:6])
            lines.append(f"| {p['job']} | {key.split('/')[1]} | {p['wall_s']} | {p['aten_calls']} | {top} |")
    if result.get("notes"):
        lines += ["", "## Reading", "", *result["notes"]]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default="iba,evaluate")
    ap.add_argument("--loads", default="0,C,2*C", help="busy-loop counts; C = the number of cores")
    ap.add_argument("--threads", default="default,1", help="torch intra-op thread settings to compare")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also count torch operator calls per job")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--child-timeout", type=float, default=None,
                    help="seconds per child run (start, model load, warm-up and job); past it the row says timeout")
    ap.add_argument("--cpus", default=None, help="run everything on these CPUs only (e.g. 0,1), like taskset")
    ap.add_argument("--name", default="busy", help="file names: <out>/<name>.json and .md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.warmup, args.profile)))
        return 0
    if args.cpus:
        os.sched_setaffinity(0, [int(c) for c in args.cpus.split(",")])  # children and busy loops inherit it
    result = measure(args)
    write_report(result, Path(args.out))
    print(f"wrote {Path(args.out) / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
