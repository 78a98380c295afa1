"""The guest that migd hosts and migrates: RAM, vCPUs, workloads, drives, device state."""

from migd.machine.machine import Machine
from migd.machine.ram import RAMBlock, RAMList
from migd.machine.vcpu import VCPU, VCPUSet

__all__ = ["Machine", "RAMBlock", "RAMList", "VCPU", "VCPUSet"]
