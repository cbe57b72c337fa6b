"""The peer watch's own logic (resnet_jax/peer_watch.py) with a stand-in key-value store:
a peer whose connections close without a goodbye is reported, one that says goodbye is not.
The real thing, with JAX's store and killed processes, is in test_multiprocess.py."""

import threading

from resnet_jax import peer_watch


class _Store:
  """JAX's distributed client, as far as the watch uses it."""

  def __init__(self):
    self._values, self._cond = {}, threading.Condition()

  def key_value_set(self, key, value):
    with self._cond:
      self._values[key] = value
      self._cond.notify_all()

  def blocking_key_value_get(self, key, timeout_ms):
    with self._cond:
      assert self._cond.wait_for(lambda: key in self._values, timeout_ms / 1000), key
      return self._values[key]


def _watches(count):
  store, deaths, watches = _Store(), [], [None] * count
  events = [threading.Event() for _ in range(count)]

  def make(i):
    def on_death(peer):
      deaths.append((i, peer))
      events[i].set()
    watches[i] = peer_watch.PeerWatch(store, i, count, on_death, coordinator="127.0.0.1:1")

  threads = [threading.Thread(target=make, args=(i,)) for i in range(count)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=600)
  assert all(watches), "the watches did not connect"
  return watches, deaths, events


def _die(watch):
  """What the kernel does to a killed process's sockets."""
  for out in watch._outgoing:
    out.close()


def test_a_peer_that_dies_is_reported_by_every_survivor():
  watches, deaths, events = _watches(3)
  _die(watches[1])
  assert events[0].wait(600) and events[2].wait(600)
  assert sorted(deaths) == [(0, 1), (2, 1)]


def test_a_peer_that_says_goodbye_is_not_reported():
  watches, deaths, events = _watches(2)
  watches[1].goodbye()
  watches[0].goodbye()
  # Both watch threads end once every incoming stream has ended; none reported a death.
  for w in watches:
    w._thread.join(timeout=600)
    assert not w._thread.is_alive()
  assert deaths == []
  assert watches[0]._departed == {1} and watches[1]._departed == {0}


def test_the_index_line_is_read_without_consuming_a_goodbye_behind_it():
  """A fast peer can say goodbye before this process accepts its connection: both lines
  are then waiting, and the index line must leave the goodbye for the watch."""
  import socket
  a, b = socket.socketpair()
  a.sendall(b"1\n" + peer_watch._GOODBYE)
  a.close()
  assert peer_watch._read_line(b) == "1"
  assert b.recv(64) == peer_watch._GOODBYE
  b.close()


def test_once_this_process_leaves_in_order_a_peer_ending_is_not_a_death():
  watches, deaths, _ = _watches(2)
  watches[0].goodbye()
  _die(watches[1])                      # process 1 ends without a goodbye after process 0 left
  for w in watches:
    w._thread.join(timeout=600)
    assert not w._thread.is_alive()
  assert deaths == []


def test_a_watch_that_cannot_connect_says_why_and_still_says_goodbye():
  class _Unreachable(_Store):
    def blocking_key_value_get(self, key, timeout_ms):
      raise TimeoutError(f"{key} never published")
  watch = peer_watch.PeerWatch(_Unreachable(), 0, 2, on_death=None)
  assert isinstance(watch.error, TimeoutError) and watch._thread is None
  watch.goodbye()
