"""resnet_jax/cpu_speed/allocator.py: a CPU-backend process started through an entry point
(lowering.prepare_process) restarts itself once with glibc's huge-page tunable and the
big-buffer reuse library preloaded, keeps the user's own settings, never overrides the
user's own LD_PRELOAD silently, leaves the allocator alone when told to, and never touches
a process that will run on a GPU or TPU (JAX_PLATFORMS, installed plugins). buffer_reuse.c
itself: big blocks come back at the same address with their alignment, realloc keeps their
bytes, the cache stays within its limit, fork works, and a jitted step stops faulting its
buffers in."""

import os
import subprocess
import sys
import textwrap

import pytest

from resnet_jax.cpu_speed import allocator

_OURS = ("GLIBC_TUNABLES", "LD_PRELOAD", "RESNET_JAX_HUGEPAGES", "RESNET_JAX_BUFFER_REUSE",
         "RESNET_JAX_BUFFER_REUSE_MIN_MIB", "RESNET_JAX_BUFFER_REUSE_MAX_MIB",
         "RESNET_JAX_BUFFER_REUSE_NOTE", "JAX_PLATFORMS")

# What an entry point does first, then what the process runs with (one line each).
_PROBE = ("import os, sys; from resnet_jax import lowering; "
          "from resnet_jax.cpu_speed import allocator; "
          "print('start', os.getpid(), flush=True); lowering.prepare_process(); "
          "print('run', os.getpid(), os.environ.get('GLIBC_TUNABLES'), "
          "allocator.buffer_reuse_active(), os.environ.get('LD_PRELOAD'), flush=True); "
          "print('describe', allocator.describe())")


def _clean_env(**changes):
  env = {k: v for k, v in os.environ.items() if k not in _OURS}
  env.update(changes)
  return env


def _probe(**env_changes):
  """[(tag, pid, ...)] of the probe's lines but the last, and describe()'s phrase."""
  out = subprocess.run([sys.executable, "-c", _PROBE], env=_clean_env(**env_changes),
                       capture_output=True, text=True, check=True, timeout=120).stdout
  lines = [line for line in out.split("\n") if line]
  assert lines[-1].startswith("describe "), lines
  return [line.split(" ") for line in lines[:-1]], lines[-1][len("describe "):]


def _run(code, preload=True, **env_changes):
  """Run `code` (after the ctypes prelude below) in a fresh interpreter, with the reuse
  library preloaded or on plain glibc; its stdout."""
  env = _clean_env(**env_changes)
  if preload:
    env["LD_PRELOAD"] = str(allocator.buffer_reuse_library())
  return subprocess.run([sys.executable, "-c", _LIBC + textwrap.dedent(code)], env=env,
                        capture_output=True, text=True, check=True, timeout=300).stdout


_LIBC = """
import ctypes, os
c = ctypes.CDLL(None)
for name in ("malloc", "aligned_alloc", "realloc"):
  getattr(c, name).restype = ctypes.c_void_p
c.malloc.argtypes = [ctypes.c_size_t]
c.aligned_alloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
c.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
c.free.argtypes = [ctypes.c_void_p]
c.malloc_usable_size.argtypes = [ctypes.c_void_p]
c.malloc_usable_size.restype = ctypes.c_size_t
c.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
MiB = 1 << 20
def mapped(address):
  for line in open("/proc/self/maps"):
    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
    if lo <= address < hi:
      return True
  return False
"""


def test_tunable_is_added_to_existing_ones_once():
  env = allocator.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  assert allocator.with_tunable(env) == env
  assert allocator.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert not allocator.enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=10"})


CPU = {"JAX_PLATFORMS": "cpu"}


def test_a_users_own_preload_is_kept_alone_unless_asked_and_then_said():
  theirs = {"LD_PRELOAD": "/opt/lib/libtcmalloc.so", "RESNET_JAX_HUGEPAGES": "0", **CPU}
  env = allocator.wanted_env(theirs)
  assert env["LD_PRELOAD"] == "/opt/lib/libtcmalloc.so" and "GLIBC_TUNABLES" not in env
  assert env["RESNET_JAX_BUFFER_REUSE"] == "0"
  assert "LD_PRELOAD already holds /opt/lib/libtcmalloc.so; RESNET_JAX_BUFFER_REUSE=1 puts " \
         "ours ahead of it" == env["RESNET_JAX_BUFFER_REUSE_NOTE"]
  asked = allocator.wanted_env(dict(theirs, RESNET_JAX_BUFFER_REUSE="1"))
  first, rest = asked["LD_PRELOAD"].split(":")
  assert allocator.buffer_reuse_preloaded({"LD_PRELOAD": first}) and rest == theirs["LD_PRELOAD"]
  assert allocator.wanted_env(asked) == asked      # already there: nothing more to add


@pytest.mark.skipif(not allocator.supported(), reason="no glibc or transparent huge pages")
def test_entry_point_restarts_itself_once_with_tunable_and_library():
  lines, said = _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=4", **CPU)
  # printed before the exec, again after it (same PID), then the run itself: exactly once
  starts = [pid for tag, pid, *_ in lines if tag == "start"]
  runs = [(pid, *rest[:2]) for tag, pid, *rest in lines if tag == "run"]
  assert len(starts) == 2 and len(set(starts)) == 1
  assert runs == [(starts[0], "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1", "True")]
  assert said == "malloc huge pages on, big-buffer reuse on"


def test_opt_outs_and_already_set_run_without_restart():
  library = str(allocator.buffer_reuse_library())
  for env, tunables, active in (
      ({"RESNET_JAX_HUGEPAGES": "0", "RESNET_JAX_BUFFER_REUSE": "0"}, "None", "False"),
      ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "LD_PRELOAD": library},
       "glibc.malloc.hugetlb=1", "True")):
    lines, _ = _probe(**env, **CPU)
    assert [tag for tag, *_ in lines] == ["start", "run"]
    assert lines[1][2:4] == [tunables, active]


def _fake_plugins(root, how: str) -> str:
  """A folder for PYTHONPATH that makes an accelerator plugin look installed, the way JAX
  finds them: a module of the `jax_plugins` namespace package, or a distribution with a
  `jax_plugins` entry point."""
  if how == "namespace":
    (root / "jax_plugins" / "fake_cuda").mkdir(parents=True)
    (root / "jax_plugins" / "fake_cuda" / "__init__.py").write_text("")
  else:
    dist = root / "fake_gpu_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-gpu-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text("[jax_plugins]\nfake_gpu = fake_gpu_module\n")
  return str(root)


@pytest.mark.parametrize("how", ["namespace", "entry_point", "jax_platforms"])
def test_a_gpu_or_tpu_process_is_never_touched(tmp_path, how):
  """No restart, no tunable, no preload: only XLA:CPU gains from them, and a CUDA/NCCL or
  libtpu process must run on the allocator it was launched with."""
  if how == "jax_platforms":
    env = {"JAX_PLATFORMS": "cuda,cpu"}
  else:
    path = _fake_plugins(tmp_path, how)
    env = {"PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])}
    found = subprocess.run(
        [sys.executable, "-c", "from resnet_jax.cpu_speed import allocator; "
                               "print(*allocator.accelerator_plugins())"],
        env=_clean_env(**env), capture_output=True, text=True, check=True).stdout.split()
    assert found == (["fake_cuda"] if how == "namespace" else ["fake_gpu"]), found
  lines, _ = _probe(**env)
  assert [tag for tag, *_ in lines] == ["start", "run"]
  assert lines[1][2:] == ["None", "False", "None"]
  # JAX_PLATFORMS=cpu says this process runs on the CPU after all: set up as usual.
  lines, said = _probe(**{**env, **CPU})
  assert [tag for tag, *_ in lines] == ["start", "start", "run"]
  assert lines[-1][3] == "True" and said.endswith("big-buffer reuse on")


def test_without_a_compiler_the_process_runs_on_and_its_start_up_line_says_why(tmp_path):
  env = _clean_env(CC=str(tmp_path / "no-such-cc"), RESNET_JAX_KERNEL_CACHE=str(tmp_path),
                   RESNET_JAX_HUGEPAGES="0", **CPU)
  result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, check=True, timeout=120)
  tags = [line.split(" ")[0] for line in result.stdout.splitlines()]
  assert tags == ["start", "run", "describe"] and result.stderr == ""
  assert "big-buffer reuse off (no C compiler found" in result.stdout.splitlines()[-1]


def test_a_cache_path_ld_preload_cannot_take_is_refused_in_one_line(tmp_path):
  lines, said = _probe(RESNET_JAX_KERNEL_CACHE=str(tmp_path / "my cache"),
                       RESNET_JAX_HUGEPAGES="0", **CPU)
  assert lines[-1][3] == "False" and "has a space or colon" in said


def test_big_blocks_are_reused_aligned_and_small_ones_left_to_glibc():
  out = _run("""
  a = c.malloc(100 * MiB)
  assert c.malloc_usable_size(a) >= 100 * MiB and a % 64 == 0
  ctypes.memset(a, 7, 100 * MiB)
  c.free(a)
  b = c.malloc(90 * MiB)                 # fits the cached block: same memory, no new mapping
  assert b == a, (hex(a), hex(b))
  big = c.malloc(400 * MiB)              # too big for it: a mapping of its own
  assert big != b
  c.free(b); c.free(big)
  p = ctypes.c_void_p()
  assert c.posix_memalign(ctypes.byref(p), 4096, 50 * MiB) == 0 and p.value % 4096 == 0
  q = c.aligned_alloc(2 * MiB, 20 * MiB)
  assert q % (2 * MiB) == 0
  c.free(p.value); c.free(q)
  small = c.malloc(1000)                 # glibc's: its usable size is glibc's rounding
  assert 1000 <= c.malloc_usable_size(small) < 1100
  c.free(small)
  c.free(None)
  print("ok")
  """)
  assert out.strip() == "ok"


def test_realloc_keeps_the_bytes_in_and_out_of_big_blocks():
  out = _run("""
  a = c.malloc(1000)
  ctypes.memmove(a, b"resnet" * 100, 600)
  a = c.realloc(a, 20 * MiB)             # glibc block -> glibc realloc (grows in glibc)
  assert ctypes.string_at(a, 600) == b"resnet" * 100
  b = c.malloc(16 * MiB)                 # ours
  ctypes.memmove(b, b"jax" * 1000, 3000)
  same = c.realloc(b, 12 * MiB)          # shrinks in place
  assert same == b
  grown = c.realloc(b, 64 * MiB)         # moves, keeps the bytes
  assert ctypes.string_at(grown, 3000) == b"jax" * 1000
  small = c.realloc(grown, 100)          # back under the threshold: glibc memory
  assert ctypes.string_at(small, 99) == (b"jax" * 40)[:99]
  c.free(small); c.free(a)
  fresh = c.realloc(None, 30 * MiB)      # realloc(NULL) is malloc: ours, reused after free
  c.free(fresh)
  assert c.malloc(30 * MiB) == fresh
  c.reallocarray.restype = ctypes.c_void_p
  c.reallocarray.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
  ctypes.memmove(fresh, b"array" * 10, 50)
  moved = c.reallocarray(fresh, 1024, 64 * 1024)   # 64 MiB: ours again, bytes kept
  assert ctypes.string_at(moved, 50) == b"array" * 10
  assert c.reallocarray(moved, 1 << 40, 1 << 40) is None   # overflow: NULL, block kept
  c.free(moved)
  print("ok")
  """)
  assert out.strip() == "ok"


def test_cache_stays_within_its_limit_and_fork_works():
  out = _run("""
  blocks = [c.malloc(40 * MiB) for _ in range(3)]
  for b in blocks:
    c.free(b)
  # a 100 MiB cache holds two 40 MiB blocks (each rounded up to 42 MiB): the oldest went
  print([mapped(b) for b in blocks])
  pid = os.fork()
  if pid == 0:                           # the child allocates, frees and reuses too
    x = c.malloc(40 * MiB); c.free(x); y = c.malloc(40 * MiB)
    os._exit(0 if x == y else 3)
  print(os.waitpid(pid, 0)[1])
  """, RESNET_JAX_BUFFER_REUSE_MAX_MIB="100")
  assert out.split("\n")[:2] == ["[False, True, True]", "0"]


def test_a_jitted_computation_stops_faulting_its_buffers_in():
  code = """
  import ctypes, resource
  ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)   # PR_SET_THP_DISABLE: count 4 KiB faults, always
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: jnp.broadcast_to(x, (64, 1024, 1024)) * 2.0)   # a 256 MiB result
  x = jnp.ones((1024, 1024), jnp.float32)
  for _ in range(6):
    f(x).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(10):
    y = f(x); y.block_until_ready(); del y
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  """
  plain = int(_run(code, preload=False))
  reused = int(_run(code))
  # glibc maps each of the 10 results afresh (65,536 pages each). Reused, at most one new
  # block is mapped: jax may free a result only after the next call has asked for its own,
  # so the cache can need one more block than the warm-up left it.
  assert plain >= 10 * 65536 * 0.95, plain
  assert reused < 1.2 * 65536, (plain, reused)


def test_a_train_step_computes_the_same_bits_on_reused_memory():
  """Reused blocks come back holding the last step's bytes, not zeros: a computation that
  read memory before writing it would now differ. A ResNet-20 forward and backward (batch
  128: its buffers are well over 8 MiB), three times, hashed: the same bits in every call
  and with or without the library."""
  code = """
  import functools, hashlib, jax, jax.numpy as jnp, numpy as np
  from resnet_jax import lowering, models
  chosen = lowering.choose("auto")
  model = models.create("resnet20", num_classes=10, **chosen.layers)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((128, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
  def loss(p):
    logits, new = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                              train=True, mutable=["batch_stats"])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0]), new
  step = chosen.jit(jax.value_and_grad(loss, has_aux=True))
  digests = []
  for _ in range(3):
    out = jax.device_get(step(variables["params"]))
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(out):
      h.update(np.asarray(leaf).tobytes())
    digests.append(h.hexdigest())
  print(chosen.name, *digests)
  """
  plain = _run(code, preload=False).split()
  reused = _run(code).split()
  assert len(set(plain[1:])) == 1, plain
  assert reused == plain
