"""The guest side of memvisor: the image it boots and the agent that runs commands inside it.

- `image.ensure_guest_image(flavour)` -> `GuestImage(kernel, initrd, kernel_release, flavour)`: a Debian 6.1
  kernel and an initramfs (busybox, e2fsprogs, the virtio/nvdimm modules, /init, the agent), built from the
  packages pinned in `pins.json` and cached (`packages.cache_dir()`); `image.build_lab_image()` is the lab's.
- `image.GUEST_CMDLINE`: the kernel command line to boot it with; the agent listens on the second UART.
- `agent.sh` documents the agent protocol (RUN/PING/POWEROFF over /dev/hvc0 or /dev/ttyS1, base64 output lines).
- `cli.add_image_commands(subparsers)`: `memvisor image build|path|pin`.
Building blocks: `cpio` (newc writer/reader), `packages` (pins, cache, `fetch_package`), `modules`
(modules.dep closure), `elf` (DT_NEEDED of programs).
"""
