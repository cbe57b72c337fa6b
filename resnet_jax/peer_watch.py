"""Notice at once when another process of a multi-process run dies, and end this one with
one line of ours (resnet_jax/distributed.py: `leave`).

Why: a survivor learns of a dead peer either from a collective that fails ("Connection
closed by peer": distributed.exit_on_peer_failure says so in one line), or -- when its
collective is still waiting, e.g. on a connection the dead peer never made, which is common
on a loaded machine -- only from JAX's coordination service, after the heartbeat timeout
(30 s), whose callback then aborts the process with a C++ stack dump. That callback cannot be
replaced from Python.

How: every process listens on a TCP port of its own, publishes it in the run's key-value
store (the coordination service JAX already runs) and connects to every other process's.
A process that dies, however it dies, has its sockets closed by the kernel; the others'
watch thread sees the end of the stream at once. A process that stops on purpose (done,
preempted, bad input: every process gets the same verdict) first says goodbye on its
connections, so its peers do not take it for dead. A whole host that vanishes closes
nothing: JAX's heartbeat remains the safety net for that.

Best effort: where the ports cannot be reached (firewalls, unusual networks), the watch is
off and says why in one line; everything else works as before.
"""

import os
import select
import socket
import sys
import threading

_KEY = "resnet_jax/peer_watch/{}"
_GOODBYE = b"bye\n"
_CONNECT_TIMEOUT_S = 60


class PeerWatch:
  def __init__(self, client, index: int, count: int, on_death, coordinator: str = ""):
    """`on_death(peer_index)` runs in the watch thread when a peer's stream ends without a
    goodbye. When connecting fails, `error` says why and nothing is watched; goodbye() still
    reaches the peers this process did connect to."""
    self.index, self.count, self._on_death = index, count, on_death
    self._outgoing: list[socket.socket] = []
    self._incoming: dict[socket.socket, int] = {}
    self._departed: set[int] = set()
    self._lock = threading.Lock()
    self._leaving = False
    self._thread: threading.Thread | None = None
    self.error: Exception | None = None
    try:
      self._connect(client, coordinator)
    except Exception as e:  # noqa: BLE001 -- any failure only means no early notice
      self.error = e
      return
    self._thread = threading.Thread(target=self._watch, name="resnet_jax-peer-watch",
                                    daemon=True)
    self._thread.start()

  def _connect(self, client, coordinator: str) -> None:
    index, count = self.index, self.count
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("", 0))
    server.listen(count)
    host = _reachable_address(coordinator)
    client.key_value_set(_KEY.format(index), f"{host}:{server.getsockname()[1]}")
    for peer in range(count):
      if peer == index:
        continue
      address = client.blocking_key_value_get(_KEY.format(peer), _CONNECT_TIMEOUT_S * 1000)
      peer_host, port = address.rsplit(":", 1)
      out = socket.create_connection((peer_host, int(port)), timeout=_CONNECT_TIMEOUT_S)
      out.sendall(f"{index}\n".encode())
      out.settimeout(None)
      self._outgoing.append(out)
    server.settimeout(_CONNECT_TIMEOUT_S)
    for _ in range(count - 1):
      conn, _ = server.accept()
      # A fast peer may already have said goodbye on this connection: read the index
      # line only, and leave the goodbye to the watch.
      peer = int(_read_line(conn))
      conn.settimeout(None)
      self._incoming[conn] = peer
    server.close()

  def _watch(self):
    received: dict[socket.socket, bytes] = {}
    while self._incoming:
      readable, _, _ = select.select(list(self._incoming), [], [])
      for conn in readable:
        try:
          data = conn.recv(64)
        except OSError:
          data = b""
        if data:                  # a goodbye, possibly in pieces; its end of stream follows
          received[conn] = received.get(conn, b"") + data
          continue
        peer = self._incoming.pop(conn)
        conn.close()
        if _GOODBYE in received.pop(conn, b""):
          with self._lock:
            self._departed.add(peer)
        elif not self._leaving:
          # Once this process is leaving in order itself, a peer's end changes nothing.
          self._on_death(peer)

  def goodbye(self) -> None:
    """This process stops on purpose: its peers must not take it for dead."""
    self._leaving = True
    for out in self._outgoing:
      try:
        out.sendall(_GOODBYE)
        out.close()
      except OSError:
        pass
    self._outgoing = []


def _read_line(conn: socket.socket) -> str:
  """One line, read a byte at a time: nothing after it is consumed."""
  data = b""
  while not data.endswith(b"\n"):
    chunk = conn.recv(1)
    if not chunk:
      break
    data += chunk
  return data.decode().strip()


def _reachable_address(coordinator: str) -> str:
  """This host's address on the interface that reaches the coordinator (a UDP connect sends
  nothing; it only picks the route)."""
  host = coordinator.rsplit(":", 1)[0] if coordinator else ""
  if host:
    try:
      with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]
    except OSError:
      pass
  return socket.gethostbyname(socket.gethostname())


_watch: PeerWatch | None = None


def start(client, index: int, count: int, on_death, coordinator: str = "") -> None:
  """Start watching this run's other processes (best effort: one line when it cannot)."""
  global _watch
  if count <= 1 or os.environ.get("RESNET_JAX_PEER_WATCH", "1") == "0":
    return
  _watch = PeerWatch(client, index, count, on_death, coordinator)
  if _watch.error is not None:
    e = _watch.error
    print(f"resnet_jax: process {index}: peer watch off ({type(e).__name__}: {e}); a dead "
          "peer is then noticed by JAX's heartbeat", file=sys.stderr, flush=True)


def goodbye() -> None:
  if _watch is not None:
    _watch.goodbye()
