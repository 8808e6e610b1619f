"""`python -m moegpt.cli ...` (what torchrun launches: `torchrun --nproc_per_node=2 -m moegpt.cli train ...`)."""

from moegpt.cli.main import app

if __name__ == "__main__":
    app()
