"""Ctrl-C and SIGTERM stop the native core's long loops (solvers, grouping, mask scans).

Every case runs in a subprocess with a time limit, so that a loop that ignores the
signal fails the test instead of hanging it. The subprocess follows the
``cobalance._core`` calls with a profiler (``sys.setprofile`` reports a C function's
call and return); the first call of the function under test starts a timer that sends
the signal a moment later, while that call runs (each would run far longer: the
solvers for 10**9 iterations). The signal handler records which native calls were
running when it ran, from the frame it ran in: only a handler run from inside the call
(by the core's poll of Python's signal handlers) runs in the caller's frame with the
call still running; without the poll it would run in the profiler, as the call
returns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cobalance

PACKAGE_ROOT = str(Path(cobalance.__file__).resolve().parent.parent)
TIMEOUT = 120  # a signal that is not acted on leaves the subprocess running into this

# Runs `work()` (defined by each test after this prelude) with the profiler on, and
# prints where the signal stopped it.
WATCH = textwrap.dedent('''
    import os, signal, sys, threading
    import numpy as np
    import cobalance
    from cobalance import _core

    TARGET, SIGNAL, DELAY = sys.argv[1], getattr(signal, sys.argv[2]), float(sys.argv[3])
    running, seen = [], []  # the cobalance._core calls in progress; the handler's view of them
    timers = []

    def _native(fn):
        owner = getattr(fn, "__self__", None)
        return getattr(fn, "__module__", None) == "cobalance._core" or type(owner).__module__ == "cobalance._core"

    def _profile(frame, event, arg):
        if event == "c_call" and _native(arg):
            running.append(arg.__name__)
            if arg.__name__ == TARGET and not timers:
                timers.append(threading.Timer(DELAY, signal.pthread_kill, (threading.main_thread().ident, SIGNAL)))
                timers[0].start()
        elif event in ("c_return", "c_exception") and _native(arg):
            running.pop()

    def _where(frame):
        # The handler runs in the frame that was executing: the caller of the native
        # call when the core's poll ran it, the profiler when Python ran it at the call's
        # return (the profiler's own code is where Python checks for signals first).
        return ["profiler"] if frame.f_code in (_profile.__code__, _native.__code__) else list(running)

    def _on_signal(signum, frame):
        seen.append(_where(frame))
        raise KeyboardInterrupt

    def watch(work):
        signal.signal(SIGNAL, _on_signal)
        sys.setprofile(_profile)
        try:
            work()
        except KeyboardInterrupt:
            sys.setprofile(None)
            print("interrupted in", seen)
        else:
            sys.setprofile(None)
            print("finished", seen)
''')


def _python(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=cwd, env=env)


def _watch(body: str, target: str, signame: str = "SIGINT", delay: float = 0.3) -> list:
    """Runs WATCH + body (which calls watch(...)), the signal sent ``delay`` seconds into
    the target call; returns its output lines."""
    proc = _python(WATCH + textwrap.dedent(body), target, signame, str(delay))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout.splitlines()


def _labels(n_samples=500, n_classes=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n_samples, n_classes)) < 0.3).astype(np.uint8)


# -- solvers -----------------------------------------------------------------------------


def test_adam_fit_stops_on_sigint():
    out = _watch('''
        Y = (np.random.default_rng(0).random((500, 6)) < 0.3).astype(np.uint8)
        balancer = cobalance.Balancer(solver="adam", regularizer="proportions", max_iter=10**9, tol=0)
        watch(lambda: balancer.fit(Y))
    ''', "adam")
    assert out[-1] == "interrupted in [['adam']]"


def test_adam_fit_stops_on_a_handler_that_raises():
    # The command line's SIGTERM handler raises its own exception; any handler's
    # exception comes through, not only KeyboardInterrupt.
    out = _watch('''
        class Stop(Exception):
            pass

        def handler(signum, frame):
            seen.append(_where(frame))
            raise Stop

        Y = (np.random.default_rng(0).random((500, 6)) < 0.3).astype(np.uint8)
        balancer = cobalance.Balancer(solver="adam", regularizer="proportions", max_iter=10**9, tol=0)
        def work():
            signal.signal(SIGNAL, handler)
            try:
                balancer.fit(Y)
            except Stop:
                print("stopped in", seen)
        sys.setprofile(_profile)
        work()
        sys.setprofile(None)
    ''', "adam", "SIGTERM")
    assert out[-1] == "stopped in [['adam']]"


def test_pg_fit_stops_on_sigint():
    # fraction + ratio over ~10k patterns: pg's first solve alone runs for many seconds
    out = _watch('''
        rng = np.random.default_rng(0)
        Y = (rng.random((100_000, 16)) < rng.random(16) * 0.5).astype(np.uint8)
        balancer = cobalance.Balancer(solver="pg", objective="fraction", regularizer="ratio", max_iter=10**9, tol=0)
        watch(lambda: balancer.fit(Y))
    ''', "projected_gradient")
    assert out[-1] == "interrupted in [['projected_gradient']]"


@pytest.mark.parametrize("objective, regularizer, gamma", [
    ("fraction", "proportions", 1e-3),  # dual Newton, then FISTA
    ("fraction", "none", 0.0),  # FISTA
    ("fraction_l2", "proportions", 1e-2),  # the outer loop over mu
])
def test_exact_solve_stops_on_sigint(objective, regularizer, gamma):
    # The Balancer's exact solve stops at its KKT tolerance; with tol=0 the core's
    # runs its 10**9 iterations.
    out = _watch(f'''
        Y = (np.random.default_rng(0).random((2000, 8)) < np.random.default_rng(1).random(8) * 0.5).astype(np.uint8)
        table = cobalance.PatternTable.from_labels(Y)
        indptr, indices = table.sparse_patterns()
        k = table.n_patterns
        problem = _core.BalanceProblem(indptr, indices, table.counts.astype(float), 8, np.full(8, 0.5))
        watch(lambda: _core.solve_exact(problem, "{objective}", "{regularizer}", {gamma}, 2000.0, np.zeros(k),
                                        np.full(k, 1e9), max_iter=10**9, tol=0.0))
    ''', "solve_exact")
    assert out[-1] == "interrupted in [['solve_exact']]"


# -- grouping and scans ----------------------------------------------------------------

# 2e8 rows of 17 classes, never written: their pages read as zeros without being
# allocated (3.4 GB of address space, a few MB of memory), and grouping them takes
# seconds.
BIG_ZEROS = "np.zeros((200_000_000, 17), np.uint8)"
# Grouping these zero rows takes about 0.4 s on a 2-core machine and can take less on a
# faster one: the signal goes 50 ms into the call (the core polls every 50 ms).
GROUPING_DELAY = 0.05


def test_from_labels_stops_on_sigint():
    out = _watch(f'''
        y = {BIG_ZEROS}
        watch(lambda: cobalance.PatternTable.from_labels(y, keep_inverse=False))
    ''', "add_dense", delay=GROUPING_DELAY)
    assert out[-1] == "interrupted in [['add_dense']]"


def test_interrupted_batch_leaves_the_builder_as_it_was():
    out = _watch(f'''
        y = {BIG_ZEROS}
        head = np.vstack([np.eye(17, dtype=np.uint8), np.zeros((3, 17), np.uint8)])
        builder = _core.PatternTableBuilder(17, True, 2)
        builder.add_dense(head)
        watch(lambda: builder.add_dense(y))
        print(builder.n_samples, builder.n_patterns)
        table = builder.finish()
        print(table.counts().tolist(), table.inverse().tolist())
    ''', "add_dense", delay=GROUPING_DELAY)
    assert out[-3] == "interrupted in [['add_dense']]"
    assert out[-2] == "20 18"
    assert out[-1] == str([1] * 17 + [3]) + " " + str(list(range(17)) + [17] * 3)


def test_mask_scan_stops_on_sigint():
    out = _watch('''
        masks = np.zeros((3000, 1000, 1000), np.uint8)  # 3 GB of untouched zero pages
        watch(lambda: cobalance.scan_masks(masks, n_classes=3))
    ''', "scan_label_maps")
    assert out[-1] == "interrupted in [['scan_label_maps']]"


# -- the command line ----------------------------------------------------------------------

# Runs the command line in this process (what `python -m cobalance` does) and sends
# the signal once its solver has started.
CLI = textwrap.dedent('''
    import os, signal, sys, threading
    from cobalance import cli

    SIGNAL = getattr(signal, sys.argv[1])
    # Python leaves SIGINT ignored when it starts with it ignored (a background job of a
    # non-interactive shell, nohup): give it the usual KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__module__", None) == "cobalance._core" and arg.__name__ == "adam":
            sys.setprofile(None)
            threading.Timer(0.3, os.kill, (os.getpid(), SIGNAL)).start()

    sys.setprofile(profile)
    sys.exit(cli.main(sys.argv[2:]))
''')


@pytest.mark.parametrize("signame, code, message", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_cli_fit_stops_on_signal_and_leaves_no_output(tmp_path, signame, code, message, suffix):
    work = tmp_path / "work"
    work.mkdir()
    cobalance.PatternTable.from_labels(_labels()).save(work / "t.npz")
    proc = _python(CLI, signame, "fit", "t.npz", "--solver", "adam", "--regularizer", "proportions",
                   "--max-iter", "1000000000", "--tol", "0", "-o", "p" + suffix, cwd=work)
    assert proc.returncode == code, proc.stderr[-4000:]
    assert f"cobalance: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(work)) == ["t.npz"]  # neither the plan, its record nor a temporary file

