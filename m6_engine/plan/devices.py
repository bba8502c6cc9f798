"""Accelerators the planner knows: memory, peak FLOP/s per precision, bandwidths.

Figures are vendor datasheet values (dense tensor-core peaks, no sparsity) and the memory total
``nvidia-smi`` reports. Interconnect figures are *per GPU, one direction*: NVLink within a node;
between nodes the GPU's share of the node's network (V100 generation: one 100 Gb/s NIC per
8-GPU node; A100: one 200 Gb/s HDR NIC per GPU; H100 / H200: one 400 Gb/s NDR NIC per GPU).
Those are assumptions about a typical cluster of that generation, not facts of the paper's one:
override them with ``dataclasses.replace`` (or the CLI flags) for a real cluster.

``usable_bytes`` leaves room for what no tensor accounts for: the CUDA context and kernels,
NCCL's buffers and allocator fragmentation (``reserved_bytes`` + ``fragmentation`` of the rest).

Host side (optimizer offload), *per GPU*: its share of the node's host memory and of its CPU
memory bandwidth, and its PCIe link to the host, for the NVIDIA DGX of that generation (the
systems' datasheets; CPU bandwidth = channels x transfer rate x 8 bytes per socket, two sockets,
shared by 8 GPUs):

    device     node           host memory      CPUs, memory channels                host GB/s / GPU   PCIe / GPU
    V100-32G   DGX-1          512 GB           2x Xeon E5-2698 v4, 4x DDR4-2400     19.2              Gen3 x16 shared by 2 GPUs: 7.9 GB/s
    A100-80G   DGX A100       2 TB             2x EPYC 7742, 8x DDR4-3200           51.2              Gen4 x16 switch shared by 2 GPUs: 15.8 GB/s
    H100-80G   DGX H100       2 TB             2x Xeon 8480C, 8x DDR5-4800          76.8              Gen5 x16: 63 GB/s
    H200-141G  DGX H200       2 TB             2x Xeon 8480C, 8x DDR5-4800          76.8              Gen5 x16: 63 GB/s

(PCIe per direction, 128b/130b encoding; the Gen5 figure assumes each GPU's switch port is not
shared on the host side.) ``host_reserved_bytes`` leaves room on the host for the rank's process,
its data loader and the operating system.
"""

import os
from dataclasses import dataclass, field

from m6_engine.config import ConfigError

GiB = 1024 ** 3
MiB = 1024 ** 2


@dataclass(frozen=True)
class Device:
    """One accelerator of a cluster and the network around it."""

    name: str
    memory_bytes: int
    """Device memory as the driver reports it."""
    peak_flops: dict = field(default_factory=dict)
    """Dense matmul peak FLOP/s by precision ("fp32", "fp16", "bf16"); a missing key is unsupported."""
    memory_bandwidth: float = 0.0
    """Device memory bandwidth, bytes/s (optimizer step estimate)."""
    intra_node_bandwidth: float = 0.0
    """Per GPU, one direction, bytes/s to a GPU of the same node (NVLink)."""
    inter_node_bandwidth: float = 0.0
    """Per GPU, one direction, bytes/s to another node (its share of the node's network)."""
    gpus_per_node: int = 8
    """Devices per node; tp groups and small dp / pp groups stay inside a node."""
    dropout_mask_bytes: int | None = 1
    """Bytes per element of a saved dropout mask: CUDA's fused dropout keeps a bool mask (1);
    None means the activation's own dtype (the CPU path saves a float mask)."""
    reserved_bytes: int = 2 * GiB
    """Context, kernels and communication buffers: never available to tensors."""
    fragmentation: float = 0.05
    """Share of the remaining memory assumed lost to allocator fragmentation."""
    host_memory_bytes: int = 0
    """Per GPU: its share of the node's host memory (offloaded optimizer state lives there)."""
    host_memory_bandwidth: float = 0.0
    """Per GPU: its share of the host CPUs' memory bandwidth, bytes/s (the offloaded AdamW step)."""
    pcie_bandwidth: float = 0.0
    """Per GPU, one direction, bytes/s between device and host memory (offload transfers)."""
    host_reserved_bytes: int = 16 * GiB
    """Per GPU: host memory the process, its data loading and the system keep for themselves."""

    def peak(self, precision: str) -> float:
        """Peak dense FLOP/s at ``precision``; a clear error when the device has no such math."""
        if precision not in self.peak_flops:
            raise ConfigError(f"device {self.name} has no {precision} peak (it supports "
                              f"{sorted(self.peak_flops)}); choose another precision or device")
        return self.peak_flops[precision]

    @property
    def usable_bytes(self) -> int:
        """Memory a plan may fill with parameters, optimizer state and activations."""
        return int((self.memory_bytes - self.reserved_bytes) * (1.0 - self.fragmentation))

    @property
    def host_usable_bytes(self) -> int:
        """Host memory a plan's offloaded optimizer may fill, per GPU."""
        return max(0, self.host_memory_bytes - self.host_reserved_bytes)

    def mask_bytes(self, element_bytes: int) -> int:
        """Bytes per saved dropout-mask element for activations of ``element_bytes``."""
        return element_bytes if self.dropout_mask_bytes is None else self.dropout_mask_bytes


def _gbps(gigabits: float) -> float:
    return gigabits * 1e9 / 8


def _pcie(gen: int, sharing_gpus: int = 1) -> float:
    """One direction of a PCIe x16 link (128b/130b encoding), shared by ``sharing_gpus`` GPUs."""
    per_lane_gt = {3: 8.0, 4: 16.0, 5: 32.0}[gen]
    return per_lane_gt * 1e9 * 16 * 128 / 130 / 8 / sharing_gpus


def _host_share(sockets: int, channels: int, megatransfers: int, gpus: int = 8) -> float:
    """A GPU's share of the node's CPU memory bandwidth: channels x rate x 8 bytes per socket."""
    return sockets * channels * megatransfers * 1e6 * 8 / gpus


GPU_DEVICES = {
    "V100-32G": Device(
        "V100-32G", 32510 * MiB, {"fp16": 125e12, "fp32": 15.7e12}, memory_bandwidth=900e9,
        intra_node_bandwidth=150e9,                 # NVLink 2: 300 GB/s both directions
        inter_node_bandwidth=_gbps(100) / 8,        # one 100 Gb/s NIC per 8-GPU node
        host_memory_bytes=512 * GiB // 8, host_memory_bandwidth=_host_share(2, 4, 2400),
        pcie_bandwidth=_pcie(3, sharing_gpus=2)),
    "A100-80G": Device(
        "A100-80G", 81920 * MiB, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
        memory_bandwidth=2039e9, intra_node_bandwidth=300e9, inter_node_bandwidth=_gbps(200),
        host_memory_bytes=2048 * GiB // 8, host_memory_bandwidth=_host_share(2, 8, 3200),
        pcie_bandwidth=_pcie(4, sharing_gpus=2)),
    "H100-80G": Device(
        "H100-80G", 81559 * MiB, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        memory_bandwidth=3350e9, intra_node_bandwidth=450e9, inter_node_bandwidth=_gbps(400),
        host_memory_bytes=2048 * GiB // 8, host_memory_bandwidth=_host_share(2, 8, 4800),
        pcie_bandwidth=_pcie(5)),
    "H200-141G": Device(
        "H200-141G", 143771 * MiB, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
        memory_bandwidth=4800e9, intra_node_bandwidth=450e9, inter_node_bandwidth=_gbps(400),
        host_memory_bytes=2048 * GiB // 8, host_memory_bandwidth=_host_share(2, 8, 4800),
        pcie_bandwidth=_pcie(5)),
}
DEVICE_NAMES = tuple(GPU_DEVICES) + ("cpu",)


def cpu_device(peak_fp32_flops: float | None = None, ranks_per_node: int | None = None) -> Device:
    """This machine as the "device" of each of ``ranks_per_node`` processes (default: one per
    core), gloo over loopback, fp32 only.

    Each rank gets an equal share of the host's physical memory; the fp32 peak is measured in
    this process (a 1024^3 matmul, best of five, with its current threads) unless given.
    Bandwidths are rough loopback / DDR figures: CPU plans are for memory checks and rehearsals,
    not for timing.
    """
    if peak_fp32_flops is None:
        import torch

        from m6_engine.metrics import measured_matmul_tflops

        peak_fp32_flops = measured_matmul_tflops(torch.device("cpu")) * 1e12
    ranks = ranks_per_node or os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks
    # The "device" is host memory: an offloaded optimizer would share it (a copy at DDR speed).
    return Device("cpu", memory, {"fp32": peak_fp32_flops}, memory_bandwidth=20e9,
                  intra_node_bandwidth=5e9, inter_node_bandwidth=_gbps(10), gpus_per_node=ranks,
                  dropout_mask_bytes=None, reserved_bytes=GiB // 2, fragmentation=0.0,
                  host_memory_bytes=memory, host_memory_bandwidth=20e9, pcie_bandwidth=20e9,
                  host_reserved_bytes=GiB // 2)


def device_preset(name: str) -> Device:
    """A device by name: one of :data:`DEVICE_NAMES` (case-insensitive)."""
    for known in GPU_DEVICES:
        if known.lower() == name.lower():
            return GPU_DEVICES[known]
    if name.lower() == "cpu":
        return cpu_device()
    raise ConfigError(f"unknown device {name!r}; choose one of {list(DEVICE_NAMES)}")
