"""A local tensor that DCP saves as chunks of a larger global tensor, on every supported torch.

``sharding`` describes a vocab-parallel weight without its padding rows, and a ZeRO-1 rank's
pieces, by four fields: ``global_shape``, and per chunk its offset in the global tensor
(``global_offsets``), its offset in the local tensor (``local_offsets``) and its size
(``local_sizes``). How DCP is told them depends on torch (``IMPLEMENTATION``, picked once, here):

- ``"protocol"`` (torch 2.14): DCP reads the four fields off the local tensor itself
  (``torch.distributed.checkpoint.CheckpointableTensor``).
- ``"hooks"`` (torch 2.11, which has no such protocol and would save the tensor as a plain one:
  its local, padded shape at offset 0, the copies of different ranks under one key): a
  :class:`ChunkedTensor`, whose ``size()`` is the global shape (2.11's load planner compares it
  with the stored one) and which answers DCP's ``_Checkpointable`` hooks, the ones DTensor
  answers (``__create_write_items__``, ``__create_chunk_list__``, ``__get_tensor_shard__``).

Both give DCP the same chunks (offsets, sizes, dtype, global size) and the same data, so the
stored format is one: a checkpoint written under either torch loads under the other. Both carry the
four fields, which ``load`` reads to check the global shape.
"""

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


def _set_fields(tensor, global_shape, global_offsets, local_offsets, local_sizes):
    tensor.global_shape = tuple(global_shape)
    tensor.global_offsets, tensor.local_offsets = tuple(global_offsets), tuple(local_offsets)
    tensor.local_sizes = tuple(local_sizes)
    return tensor


def protocol_tensor(buffer: torch.Tensor, global_shape, global_offsets, local_offsets, local_sizes):
    """A new tensor object on ``buffer``'s storage carrying the CheckpointableTensor fields."""
    return _set_fields(buffer.detach(), global_shape, global_offsets, local_offsets, local_sizes)


class ChunkedTensor(torch.Tensor):
    """``buffer``'s chunks (views, so a load writes into ``buffer``) as a tensor of the global
    shape that only DCP's ``_Checkpointable`` hooks use: it holds no data of its own, and any
    operation on it raises."""

    @staticmethod
    def __new__(cls, buffer: torch.Tensor, global_shape, global_offsets, local_offsets, local_sizes):
        self = torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_shape), dtype=buffer.dtype,
                                                   device=buffer.device, requires_grad=False)
        self.buffer = buffer.detach()
        return _set_fields(self, global_shape, global_offsets, local_offsets, local_sizes)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"ChunkedTensor only describes checkpoint chunks to DCP; {func} is not supported on it")

    def __repr__(self):
        return (f"ChunkedTensor(global_shape={self.global_shape}, chunks={len(self.global_offsets)}, "
                f"dtype={self.dtype})")

    def _chunks(self):
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                for o, s in zip(self.global_offsets, self.local_sizes)]

    def __create_write_items__(self, fqn: str, obj) -> list:
        properties = TensorProperties.create_from_tensor(self.buffer)
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets, i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=properties,
                                                      size=torch.Size(self.global_shape)))
                for i, chunk in enumerate(self._chunks())]

    def __create_chunk_list__(self) -> list:
        return self._chunks()

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        """The view of ``buffer`` holding the chunk at global offset ``index.offset``."""
        offsets = [torch.Size(o) for o in self.global_offsets]
        i = index.index
        if i is None or not (0 <= i < len(offsets) and offsets[i] == index.offset):
            if index.offset is None and len(offsets) == 1:
                i = 0
            elif index.offset in offsets:
                i = offsets.index(index.offset)
            else:
                raise ValueError(f"no chunk of {index.fqn} at offset {index.offset} on this rank")
        return self.buffer[tuple(slice(o, o + n) for o, n in zip(self.local_offsets[i], self.local_sizes[i]))]


IMPLEMENTATIONS = {"protocol": protocol_tensor, "hooks": ChunkedTensor}


def available() -> list[str]:
    """The implementations this torch's DCP understands, preferred first."""
    return (["protocol"] if hasattr(dcp, "CheckpointableTensor") else []) + ["hooks"]


IMPLEMENTATION = available()[0]
chunked_tensor = IMPLEMENTATIONS[IMPLEMENTATION]
"""``chunked_tensor(buffer, global_shape, global_offsets, local_offsets, local_sizes)``: what DCP
saves from and loads into (``buffer`` is read or written in place); offsets and sizes are tuples
of per-chunk tuples, possibly none (a rank holding nothing of the tensor)."""


def use(name: str) -> None:
    """Make :data:`chunked_tensor` the implementation ``name`` (tests compare the two)."""
    global IMPLEMENTATION, chunked_tensor
    if name not in available():
        raise RuntimeError(f"chunk implementation {name!r} is not available in this torch ({available()})")
    IMPLEMENTATION, chunked_tensor = name, IMPLEMENTATIONS[name]


__all__ = ["ChunkedTensor", "IMPLEMENTATION", "IMPLEMENTATIONS", "available", "chunked_tensor",
           "protocol_tensor", "use"]
