"""``python -m codebook_lens.cli``: the same as the ``codebook-lens`` command."""

from codebook_lens.cli.main import entry

raise SystemExit(entry())
