"""resnet_jax.hugepages: the command-line entry points restart themselves once with glibc's
huge-page tunable (XLA:CPU otherwise re-faults every page of its step buffers), keep the
user's other tunables, and leave the allocator alone when told to or when it cannot help."""

import os
import subprocess
import sys

import pytest

from resnet_jax import hugepages

_PROBE = ("import os, sys; from resnet_jax import hugepages; "
          "print('start', os.getpid(), flush=True); hugepages.reexec_if_missing(); "
          "print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'))")


def _probe(**env_changes):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                         "RESNET_JAX_HUGEPAGES")}
  env.update(env_changes)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                       text=True, check=True, timeout=60).stdout.split("\n")
  return [line.split(" ", 2) for line in out if line]


def test_tunable_is_added_to_existing_ones_once():
  env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert hugepages.with_tunable(env) == env
  assert hugepages.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert not hugepages.enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=10"})


@pytest.mark.skipif(not hugepages.supported(), reason="no glibc or transparent huge pages")
def test_entry_point_restarts_itself_once_with_the_tunable():
  lines = _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  # printed before the exec, again after it (same PID), then the run itself: exactly once
  starts = [pid for tag, pid, *_ in lines if tag == "start"]
  runs = [(pid, rest[0]) for tag, pid, *rest in lines if tag == "run"]
  assert len(starts) == 2 and len(set(starts)) == 1
  assert runs == [(starts[0], "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1")]


def test_opt_out_and_already_set_run_without_restart():
  for env in ({"RESNET_JAX_HUGEPAGES": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}):
    lines = _probe(**env)
    assert [tag for tag, *_ in lines] == ["start", "run"]
    assert lines[1][2] == env.get("GLIBC_TUNABLES", "None")
