"""Snapshots: every piece of VM state as validated data (state types), and the snapshot file that holds it.

- codec.py: frozen dataclasses <-> plain JSON values, checking every field's type and naming it when wrong.
- cpu.py: the x86 vCPU and VM-wide KVM state (VcpuState, VmState), captured and restored in the right order.
- memory.py: guest RAM as a sparse file: only pages that hold data are written, everything else stays a hole.
- fileformat.py: the snapshot file (header, state, per-region bitmaps and page data, checksums, version).
"""
