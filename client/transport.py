"""How tensors travel to the server and back: gRPC payloads or system shared memory.

- :class:`GrpcTransport`: the tensors ride in the gRPC messages (any host).
- :class:`SharedMemoryTransport`: on the server's own host, the inputs and
  outputs go through POSIX shared memory regions (tritonclient's
  ``shared_memory`` utilities) and only the request's description crosses the
  socket. Regions are made and registered once per worker slot, reused, grown
  when a bigger request comes, re-registered after a server restart, and
  unregistered and unlinked on :meth:`close`, at interpreter exit, and when
  the object is garbage-collected (so an interrupted batch leaves nothing in
  ``/dev/shm``). A server listening beyond loopback wants its local secret on
  these calls (``headers``, :func:`lumireg.client.security.shared_memory_headers`).

Both return ``{output name: numpy array}`` (copies, safe to keep). String
outputs (``qc``) always come in the gRPC payload. No torch.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
import weakref

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from lumireg.contract import ENTRY_MODEL, OUTPUTS

OUTPUT_TYPES = {
    name: (triton_to_np_dtype(kind.removeprefix("TYPE_").replace("STRING", "BYTES")), dims)
    for name, kind, dims in OUTPUTS
}


def _input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    return grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))


def payload_inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """Request inputs whose data ride in the gRPC message, from ``{name: array}`` (Triton type from the dtype)."""
    tensors = []
    for name, array in arrays.items():
        tensor = _input(name, array)
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        tensors.append(tensor)
    return tensors


def output_nbytes(name: str, batch: int) -> int:
    """Bytes of fixed-size output ``name`` for ``batch`` pairs."""
    dtype, dims = OUTPUT_TYPES[name]
    return batch * int(np.prod(dims)) * np.dtype(dtype).itemsize


class GrpcTransport:
    """Tensors in the gRPC messages."""

    def infer(
        self,
        client,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        timeout: float | None,
        parameters: dict | None = None,
    ) -> dict:
        result = client.infer(
            ENTRY_MODEL,
            payload_inputs(inputs),
            outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
            client_timeout=timeout,
            parameters=parameters,
        )
        return {name: np.array(result.as_numpy(name)) for name in outputs}

    def reset(self, client) -> None:
        """Nothing to restore after a server restart."""

    def close(self, client=None) -> None:
        """Nothing to release."""


class _Region:
    """One POSIX shared memory region, registered with the server under ``name``."""

    def __init__(self, name: str, size: int):
        self.name, self.key, self.size = name, f"/{name}", size
        self.handle = shm.create_shared_memory_region(name, self.key, size)

    def register(self, client, headers: dict | None = None) -> None:
        client.register_system_shared_memory(self.name, self.key, self.size, headers=_copy(headers))

    def release(self, client=None, headers: dict | None = None) -> None:
        if client is not None:
            try:
                client.unregister_system_shared_memory(self.name, headers=_copy(headers))
            except Exception:  # the server may be gone; the region is ours to unlink anyway
                pass
        shm.destroy_shared_memory_region(self.handle)


def _copy(headers: dict | None) -> dict | None:
    return dict(headers) if headers else None  # tritonclient's plugins add to the dict they are given


def _release_all(regions: dict, lock: threading.Lock) -> None:
    with lock:
        for region in regions.values():
            try:
                region.release()
            except Exception:
                pass
        regions.clear()


class SharedMemoryTransport:
    """Inputs and fixed-size outputs through system shared memory; one input and one output region per slot.

    Args:
        slots: how many requests may be in flight at once (one pair of regions each).
        headers: extra headers for the shared-memory calls (the secret of a server listening beyond loopback).
    """

    def __init__(self, slots: int = 1, headers: dict | None = None):
        self.headers = headers
        self._prefix = f"lumireg_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        # unlinked at exit or garbage collection even if close() is never called
        self._finalizer = weakref.finalize(self, _release_all, self._regions, self._lock)

    def _region(self, client, slot: int, kind: str, size: int) -> _Region:
        name = f"{self._prefix}_{slot}_{kind}"
        with self._lock:
            region = self._regions.get(name)
            if region is not None and region.size >= size:
                return region
            if region is not None:
                region.release(client, self.headers)
            region = self._regions[name] = _Region(name, size)
        region.register(client, self.headers)
        return region

    def infer(
        self,
        client,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        timeout: float | None,
        parameters: dict | None = None,
    ) -> dict:
        slot = self._free.get()
        try:
            return self._infer(client, slot, inputs, outputs, timeout, parameters)
        finally:
            self._free.put(slot)

    def _infer(self, client, slot, inputs, outputs, timeout, parameters) -> dict:
        arrays = [np.ascontiguousarray(a) for a in inputs.values()]
        region = self._region(client, slot, "in", sum(a.nbytes for a in arrays))
        shm.set_shared_memory_region(region.handle, arrays)
        tensors, offset = [], 0
        for name, array in zip(inputs, arrays):
            tensor = _input(name, array)
            tensor.set_shared_memory(region.name, array.nbytes, offset)
            tensors.append(tensor)
            offset += array.nbytes
        batch = arrays[0].shape[0]
        fixed_size = [n for n in outputs if OUTPUT_TYPES[n][0] is not np.object_]
        out_region = self._region(client, slot, "out", max(1, sum(output_nbytes(n, batch) for n in fixed_size)))
        requested, places, offset = [], {}, 0
        for name in outputs:
            request = grpcclient.InferRequestedOutput(name)
            if name in fixed_size:
                request.set_shared_memory(out_region.name, output_nbytes(name, batch), offset)
                places[name] = offset
                offset += output_nbytes(name, batch)
            requested.append(request)
        result = client.infer(ENTRY_MODEL, tensors, outputs=requested, client_timeout=timeout, parameters=parameters)
        answer = {}
        for name in outputs:
            if name in places:
                dtype, dims = OUTPUT_TYPES[name]
                answer[name] = np.array(
                    shm.get_contents_as_numpy(out_region.handle, dtype, [batch, *dims], places[name])
                )
            else:
                answer[name] = np.array(result.as_numpy(name))
        return answer

    def reset(self, client) -> None:
        """Register every region again (a restarted server has forgotten them)."""
        with self._lock:
            regions = list(self._regions.values())
        for region in regions:
            try:
                client.unregister_system_shared_memory(region.name, headers=_copy(self.headers))
            except Exception:
                pass
            region.register(client, self.headers)

    def close(self, client=None) -> None:
        """Unregister (when ``client`` is given) and unlink every region."""
        with self._lock:
            for region in self._regions.values():
                region.release(client, self.headers)
            self._regions.clear()
        self._finalizer.detach()
