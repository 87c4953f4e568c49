"""Ctrl-C to mpirun: every rank stops after the same step and the job exits 130.

mpirun (MPICH's hydra) forwards SIGINT to every rank. mpi_scripts/ctrl_c.py
turns it into a flag carried by the reducer's control vector, as train.py
does, so that all ranks stop together. SIGINT goes to mpirun, never to the
ranks, at a random moment after every rank has its handler (during MPI's
start, a step, an allreduce, the sleep between steps); 20 short jobs.
"""
import os
import queue
import random
import re
import signal
import subprocess
import threading
import time

from tests.distributed.launch import REPO, job_env, mpirun_command, needs_mpirun

TRIALS, RANKS = 20, 2
END_S = 5  # how long the job may take to end after Ctrl-C


def read_lines(stream, into):
    for line in iter(stream.readline, ""):
        into.put(line)
    into.put(None)


def one_trial(delay):
    """Start the job, send SIGINT to mpirun ``delay`` s after all ranks are
    armed; returns (exit status, output, seconds from SIGINT to the end)."""
    proc = subprocess.Popen(mpirun_command(RANKS, "ctrl_c.py"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=job_env(), cwd=REPO,
                            start_new_session=True)  # its own group: killed whole on a hang
    lines, out = queue.Queue(), []
    reader = threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        give_up = time.monotonic() + 60
        while "".join(out).count(": armed") < RANKS:  # mpirun may join two ranks' lines
            line = lines.get(timeout=max(0.1, give_up - time.monotonic()))
            assert line is not None, "the job ended before every rank was armed:\n" + "".join(out)
            out.append(line)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)  # to mpirun only, as a terminal's Ctrl-C would
        sent = time.monotonic()
        try:
            proc.wait(timeout=END_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the job hung after Ctrl-C (delay {delay:.3f} s):\n"
                                 + "".join(out)) from None
        seconds = time.monotonic() - sent
        reader.join(timeout=5)
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                out.append(line)
        return proc.returncode, "".join(out), seconds
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)
        if not reader.is_alive():  # (never under a reader's feet)
            proc.stdout.close()


@needs_mpirun
def test_ctrl_c_stops_every_rank_at_the_same_step():
    seed = random.randrange(2 ** 32)
    rng = random.Random(seed)
    outcomes = []
    for trial in range(TRIALS):
        delay = rng.uniform(0.0, 1.0)
        code, out, seconds = one_trial(delay)
        stops = dict(re.findall(r"rank (\d+): stopped at step (\d+)", out))
        where = f"trial {trial} (seed {seed}, delay {delay:.3f} s): exit {code}\n{out}"
        assert code == 130, where
        assert sorted(stops) == [str(r) for r in range(RANKS)], where
        assert len(set(stops.values())) == 1, where  # the same step on every rank
        assert "Traceback" not in out and "timed out" not in out, where
        outcomes.append((round(delay, 3), int(stops["0"]), round(seconds, 2)))
    print("delay s, stopped at step, s to end:", outcomes)
