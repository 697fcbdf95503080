"""Host-side batching: a deterministic, resumable epoch iterator and a background prefetcher.

The batch of global step `s` is a pure function of (seed, s), so a run resumed at step `s`
sees exactly the batches an uninterrupted run sees.
"""

import queue
import threading
from typing import Iterator, Optional

import numpy as np


ORDERS = ("epoch", "uniform")  # data.order


class EpochLoader:
  """Host-side iterator over uint8 images: seeded shuffle, global batch sharded.

  With order="epoch" (the default), epoch `e` visits the rows in the order
  `np.random.default_rng([seed, e]).permutation(N)`; the last `N % global_batch_size` rows of
  each permutation are dropped. With order="uniform", every step draws its global batch
  afresh (without replacement inside the batch) from `default_rng([seed, UNIFORM_STREAM,
  step])`, so an example's memory-bank row is as old, on average, as any other row when it
  is visited (docs/contrastive_baselines.md §3.1); "epochs" then only count steps. The global batch is
  split contiguously: device `d` of process `p` holds global-batch rows
  `[(p * num_devices + d) * b, (p * num_devices + d + 1) * b)` with
  `b = global_batch_size // (process_count * num_devices)`.
  """

  UNIFORM_STREAM = 0x5EED  # keeps the uniform draws apart from the epoch permutations

  def __init__(self, images: np.ndarray, *, global_batch_size: int, num_devices: int, seed: int,
               process_index: int = 0, process_count: int = 1, order: str = "epoch"):
    if order not in ORDERS:
      raise ValueError(f"order must be one of {ORDERS}, got {order!r}.")
    if images.ndim != 4:
      raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}.")
    if num_devices < 1 or process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"Need num_devices >= 1 and 0 <= process_index < process_count, got "
                       f"num_devices={num_devices}, process_index={process_index}, "
                       f"process_count={process_count}.")
    shards = num_devices * process_count
    if global_batch_size < 1 or global_batch_size % shards:
      raise ValueError(f"The global batch size {global_batch_size} must be a positive multiple "
                       f"of num_devices * process_count = {num_devices} * {process_count} = "
                       f"{shards}; change --config.batch_size or --config.num_devices.")
    num_examples = images.shape[0]
    self.steps_per_epoch = num_examples // global_batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"The global batch size {global_batch_size} exceeds the {num_examples} "
                       f"training examples, so an epoch has no full batch; lower "
                       f"--config.batch_size.")
    self.images = images
    self.num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.num_devices = num_devices
    self.per_device_batch_size = global_batch_size // shards
    self.seed = seed
    self.order = order
    self.process_index = process_index
    self.process_count = process_count
    # Memo of the last (epoch, permutation); replaced as one tuple so that threads sharing the
    # loader never pair an epoch with another epoch's permutation. Results never depend on it.
    self._memo: Optional[tuple[int, np.ndarray]] = None

  def permutation(self, epoch: int) -> np.ndarray:
    """The visiting order of `epoch` (a pure function of seed and epoch)."""
    memo = self._memo
    if memo is None or memo[0] != epoch:
      memo = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples))
      self._memo = memo
    return memo[1]

  def global_indices_at(self, step: int) -> np.ndarray:
    """Rows of `images` in the whole global batch of `step` (all processes), int64 (G,)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    if self.order == "uniform":
      rng = np.random.default_rng([self.seed, self.UNIFORM_STREAM, step])
      return rng.choice(self.num_examples, self.global_batch_size, replace=False)
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.global_batch_size
    return self.permutation(epoch)[start:start + self.global_batch_size]

  def batch_at(self, step: int) -> dict:
    """This process's part of global batch `step`.

    Returns {'image': uint8 (num_devices, b, H, W, C), 'index': int32 (num_devices, b)}, where
    'index' is each example's row in `images` (it addresses the memory bank).
    """
    local = self.num_devices * self.per_device_batch_size
    start = self.process_index * local
    idx = self.global_indices_at(step)[start:start + local]
    # Sorted gathers are faster on big arrays; undo the sort to keep the batch order.
    order = np.argsort(idx, kind="stable")
    gathered = np.empty((local,) + self.images.shape[1:], self.images.dtype)
    gathered[order] = self.images[idx[order]]
    shape = (self.num_devices, self.per_device_batch_size)
    return {"image": gathered.reshape(shape + self.images.shape[1:]),
            "index": idx.astype(np.int32).reshape(shape)}

  def iterate(self, start_step: int = 0) -> Iterator[dict]:
    """batch_at(start_step), batch_at(start_step + 1), ...; never ends."""
    step = start_step
    while True:
      yield self.batch_at(step)
      step += 1


_END = object()


class _Failure:
  """Carries an exception raised in the producer thread to the consumer."""

  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher:
  """Iterates `iterator` in a background thread, keeping up to `size` items ready.

  Exceptions from the producer re-raise in the consumer at the point they occurred;
  `close()` (or leaving a `with` block) stops the thread without draining the source.
  """

  def __init__(self, iterator: Iterator, size: int):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}.")
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._produce, args=(iterator,), daemon=True,
                                    name="metaug-prefetch")
    self._thread.start()

  def _put(self, item) -> bool:
    """Blocks until `item` is queued or close() is called; False if closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, iterator: Iterator) -> None:
    try:
      for item in iterator:
        if not self._put(item):
          return
      self._put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_Failure(e))

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Failure):
      self._done = True
      raise item.error
    return item

  def close(self, timeout: float = 5.0) -> None:
    """Stops the producer thread and waits (up to `timeout` s) for it to exit."""
    self._done = True
    self._stop.set()
    while True:  # Unblock a producer waiting on a full queue.
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def __del__(self):
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()


def prefetch(iterator: Iterator, size: int) -> Prefetcher:
  """Runs `iterator` ahead in a background thread with a bounded queue of `size` items."""
  return Prefetcher(iterator, size)
