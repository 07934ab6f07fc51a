"""The lab: hardware-speed-enough KVM on machines without it (docs/LAB.md).

`memvisor lab -- COMMAND...` (or `runner.run_in_lab`) boots a QEMU TCG guest whose emulated AMD SVM lets
its kernel load kvm_amd with nested paging; the guest sees this machine's files read-only over 9p and runs
COMMAND there, with its output, exit status, shared folders and forwarded UNIX sockets carried back.

Modules, host side first:
- `cli`      the `memvisor lab` subcommand (`lab_main`);
- `runner`   starts QEMU, speaks to the agent, bridges stdio and forwarded sockets (`run_in_lab`);
- `plan`     checks shares, forwards and memory; builds the QEMU command line;
- `vmlinux`  boots the kernel as a PVH ELF (no decompression under TCG);
- `detect`   is /dev/kvm hardware, software (kvm_pvm) or missing (`kvm_status`);
- `mux`      the frame protocol over the one virtio-serial port; `pump` the event loop both ends use;
- `init.sh`  PID 1 of the lab guest; `inner` the agent it starts, which runs COMMAND.
"""
