"""Live migration between memvisor processes: the stream (stream.py), its transport (transport.py), the
dirty-page pre-copy source (source.py), the destination (incoming.py) and the QMP job (job.py).
Interface and stream layout: docs/MIGRATION.md."""
