"""memvisor: a virtual machine monitor in Python on KVM, built around managing guest memory."""
